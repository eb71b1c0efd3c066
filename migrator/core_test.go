package migrator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
)

func discardLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// forward is every call of a migration that succeeds, in order.
var forward = []string{
	"dest: prepare",
	"source: prepare (peer 192.0.2.2, 10.1.0.10)",
	"dns: prepare ttl 5",
	"dest: create image",
	"driver: prepare destination",
	"dest: attach vm (peer true)",
	"disk: bulk",
	"disk: prehash",
	"source: hash whole=true chunks=[]",
	"dest: hash whole=true chunks=[]",
	"driver: migrate",
	"driver: source paused",
	"source: redirect on=true",
	"disk: final",
	"source: hash whole=false chunks=[0]",
	"dest: hash whole=false chunks=[0]",
	"driver: destination running",
	"disk: release",
	"dns: flip",
	"dns: restore ttl 300",
	"source: redirect state",
	"driver: stop source",
}

// TestRunPhaseOrder: a migration that succeeds calls each host, the
// driver, the disk strategy and DNS in the order of the phases, and the
// digests both hosts computed of real images agree.
func TestRunPhaseOrder(t *testing.T) {
	w := newWorld(t, "web1")
	w.dns.ev = &events{} // beside the disk phases: its place in the log varies
	rep, err := Run(context.Background(), w.plan)
	if err != nil {
		t.Fatal(err)
	}
	want := slices.DeleteFunc(slices.Clone(forward), func(s string) bool { return strings.HasPrefix(s, "dns:") })
	sameEvents(t, pauseOrder(w.ev.get()), want)
	sameEvents(t, w.dns.ev.get(), []string{"dns: prepare ttl 5", "dns: flip", "dns: restore ttl 300"})
	var names []string
	for _, ph := range rep.Phases {
		names = append(names, ph.Name)
	}
	// dns-prepare runs beside destination and the disk phases.
	names = slices.DeleteFunc(names, func(s string) bool { return s == "dns-prepare" })
	if got := strings.Join(names, " "); got != "datapath destination disk-bulk disk-prehash memory disk-release dns-flip dns-restore source-cleanup" || len(rep.Phases) != 10 {
		t.Errorf("phases %s (and dns-prepare: %d in all)", got, len(rep.Phases))
	}
	src, _ := os.ReadFile(w.srcImg)
	dst, _ := os.ReadFile(w.dstImg)
	h, err := storage.HashImage(w.srcImg)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.DigestMatch || rep.Digest != fmt.Sprintf("%x", h.Root()[:8]) || !bytes.Equal(src, dst) {
		t.Fatalf("digest match %v, digest %s, want %x", rep.DigestMatch, rep.Digest, h.Root()[:8])
	}
	if rep.VerifyChunks != 1 || rep.VerifyRead != 2<<20 || rep.DigestRead != 2*3<<20 {
		t.Errorf("pause re-hashed %d chunks, %d bytes; pre-hash read %d", rep.VerifyChunks, rep.VerifyRead, rep.DigestRead)
	}
	if w.src.redirect != "on" || w.drv.source != "quit" || w.drv.dest != "running" || !w.dst.vm || w.dns.rec.Addr != newIP {
		t.Fatalf("after: redirect %q, source %q, destination %q, vm entry %v, dns %v", w.src.redirect, w.drv.source, w.drv.dest, w.dst.vm, w.dns.rec)
	}
	if rep.Redirected["encap_packets"] != 3 || rep.DiskStrategy != "fake" || rep.DiskWire != 2*3<<20 {
		t.Errorf("report: redirected %v, strategy %q, wire %d", rep.Redirected, rep.DiskStrategy, rep.DiskWire)
	}

	// Drain: the redirect goes, the VM entry loses its tunnel peer. (The
	// fake's records were never in a resolver's cache: no TTL to wait out.)
	w.plan.dnsCachedUntil = time.Time{}
	if _, err := Drain(context.Background(), w.plan); err != nil {
		t.Fatal(err)
	}
	if w.src.redirect != "" || !w.dst.vm || w.dst.peer.IsValid() || w.src.tunnels != 0 || w.dst.tunnels != 0 {
		t.Fatalf("after drain: redirect %q, vm entry %v, peer %v, tunnels %d and %d", w.src.redirect, w.dst.vm, w.dst.peer, w.src.tunnels, w.dst.tunnels)
	}
}

// TestRunUndoAtEachPhase fails each step in turn. Every failure before
// the destination runs must undo what was done, in reverse: the VM runs
// on at the source, the redirect is gone, the destination holds nothing
// (image removed, VM entry gone, hypervisor stopped), DNS is as it was.
func TestRunUndoAtEachPhase(t *testing.T) {
	for _, c := range []struct {
		name  string
		setup func(w *fakeWorld)
		want  error  // errors.Is
		last  string // the last forward event before the undo
		undo  []string
	}{
		{"destination datapath", func(w *fakeWorld) { w.dst.fail["dest-prepare"] = nil }, errInjected,
			"dest: prepare", nil},
		{"source datapath", func(w *fakeWorld) { w.src.fail["source-prepare"] = nil }, errInjected,
			"source: prepare (peer 192.0.2.2, 10.1.0.10)", nil},
		{"destination hypervisor", func(w *fakeWorld) { w.drv.fail["driver-prepare"] = nil }, errInjected,
			"driver: prepare destination", []string{"dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"destination tap", func(w *fakeWorld) { w.dst.fail["dest-attach"] = nil }, errInjected,
			"dest: attach vm (peer true)", []string{"driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"disk bulk", func(w *fakeWorld) { w.disk.fail["bulk"] = nil }, errInjected,
			"disk: bulk", []string{"disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"disk prehash", func(w *fakeWorld) { w.disk.fail["prehash"] = nil }, errInjected,
			"disk: prehash", []string{"disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"memory not converging", func(w *fakeWorld) { w.drv.fail["migrate"] = nil }, hypervisor.ErrNotConverging,
			"driver: migrate", []string{"disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"disk final", func(w *fakeWorld) { w.disk.fail["final"] = nil }, hypervisor.ErrSwitchover,
			"driver: source resumed", []string{"source: redirect on=false", "disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"digest mismatch", func(w *fakeWorld) { w.disk.damage = true }, hypervisor.ErrSwitchover,
			"driver: source resumed", []string{"source: redirect on=false", "disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"switch hook", func(w *fakeWorld) {
			w.plan.OnSwitch = func(context.Context) error { return errInjected }
		}, hypervisor.ErrSwitchover,
			"driver: source resumed", []string{"source: redirect on=false", "disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
		{"destination fails to resume", func(w *fakeWorld) { w.drv.fail["destination-resume"] = nil }, hypervisor.ErrDestinationFailed,
			"driver: source resumed", []string{"source: redirect on=false", "disk: abort", "driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: redirect removed"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := newWorld(t, "web1")
			dnsEv := &events{}
			w.dns.ev = dnsEv // beside the disk phases: checked on its own
			c.setup(w)
			rep, err := Run(context.Background(), w.plan)
			if !errors.Is(err, c.want) {
				t.Fatalf("err = %v, want %v", err, c.want)
			}
			ev := pauseOrder(w.ev.get())
			i := slices.Index(ev, c.last)
			if i < 0 {
				t.Fatalf("no %q in:\n  %s", c.last, strings.Join(ev, "\n  "))
			}
			undo := slices.DeleteFunc(slices.Clone(c.undo), func(s string) bool { return strings.HasPrefix(s, "dns:") })
			sameEvents(t, ev[i+1:], undo)
			// The forward part is the successful run's, cut at the failure.
			fw := slices.DeleteFunc(slices.Clone(forward), func(s string) bool { return strings.HasPrefix(s, "dns:") })
			sameEvents(t, ev[:i], fw[:i])
			if w.src.tunnels > 0 || w.dst.tunnels > 0 {
				t.Errorf("tunnels left accepted: %d on the source, %d on the destination", w.src.tunnels, w.dst.tunnels)
			}
			if w.drv.source != "running" || w.src.redirect != "" || w.dst.vm || w.drv.dest != "" {
				t.Errorf("after: source %q, redirect %q, vm entry %v, destination %q", w.drv.source, w.src.redirect, w.dst.vm, w.drv.dest)
			}
			if _, err := os.Stat(w.dstImg); !os.IsNotExist(err) {
				t.Errorf("destination image left behind: %v", err)
			}
			if w.dns.rec.Addr != oldIP || w.dns.rec.TTL != 300 {
				t.Errorf("dns after failure: %+v, want %s ttl 300; calls %v", w.dns.rec, oldIP, dnsEv.get())
			}
			if !slices.ContainsFunc(rep.Phases, func(ph Phase) bool { return ph.Err != "" }) {
				t.Errorf("no phase carries the error: %+v", rep.Phases)
			}
		})
	}
}

// TestCommitPoint: once the VM runs at the destination nothing is undone.
// A failed DNS flip fails the migration but leaves the VM at the
// destination, the redirect on (clients of the old address still reach
// it); a failed disk release is only a warning.
func TestCommitPoint(t *testing.T) {
	w := newWorld(t, "web1")
	w.dns.fail["flip"] = nil
	w.disk.fail["release"] = nil
	_, err := Run(context.Background(), w.plan)
	if !errors.Is(err, errInjected) || !strings.Contains(err.Error(), "dns-flip") {
		t.Fatalf("err = %v, want the dns-flip failure", err)
	}
	for _, e := range w.ev.get() {
		if strings.Contains(e, "abort") || strings.Contains(e, "resume") || strings.Contains(e, "removed") {
			t.Errorf("undo after the commit point: %q", e)
		}
	}
	if w.drv.dest != "running" || w.src.redirect != "on" || !w.dst.vm {
		t.Fatalf("after: destination %q, redirect %q, vm entry %v", w.drv.dest, w.src.redirect, w.dst.vm)
	}
	if _, err := os.Stat(w.dstImg); err != nil {
		t.Fatalf("destination image: %v", err)
	}
}

// TestSecondMigrationRefused: while a migration of a VM runs, another of
// the same VM is refused before it touches anything; the first completes
// with its digest intact. A migration of another VM is not held up.
func TestSecondMigrationRefused(t *testing.T) {
	first := newWorld(t, "web1")
	first.drv.hold = make(chan struct{})
	type result struct {
		rep Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := Run(context.Background(), first.plan)
		done <- result{rep, err}
	}()
	<-first.drv.inMig // the first is in its memory copy

	second := newWorld(t, "web1")
	second.plan.DestDisk = first.dstImg // the same VM: the same destination image
	_, err := Run(context.Background(), second.plan)
	if !errors.Is(err, ErrInProgress) {
		t.Fatalf("second migration: err = %v, want ErrInProgress", err)
	}
	if ev := second.ev.get(); len(ev) != 0 {
		t.Fatalf("the refused migration acted: %v", ev)
	}
	other := newWorld(t, "db1")
	if _, err := Run(context.Background(), other.plan); err != nil {
		t.Fatalf("another vm: %v", err)
	}

	close(first.drv.hold)
	r := <-done
	if r.err != nil || !r.rep.DigestMatch {
		t.Fatalf("first migration: %v, digest match %v", r.err, r.rep.DigestMatch)
	}
	src, _ := os.ReadFile(first.srcImg)
	dst, _ := os.ReadFile(first.dstImg)
	if !bytes.Equal(src, dst) {
		t.Fatal("first migration's destination image differs from its source")
	}
	// Done: the VM may migrate again (its next destination image is new).
	again := newWorld(t, "web1")
	if _, err := Run(context.Background(), again.plan); err != nil {
		t.Fatalf("after the first completed: %v", err)
	}
}

// TestDestinationImageNeverTruncated: an image already at the
// destination path is refused, left byte for byte as it was, and not
// removed by the undo.
func TestDestinationImageNeverTruncated(t *testing.T) {
	w := newWorld(t, "web1")
	old := []byte("a VM already lives here")
	if err := os.WriteFile(w.dstImg, old, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Run(context.Background(), w.plan)
	if !errors.Is(err, ErrImageExists) {
		t.Fatalf("err = %v, want ErrImageExists", err)
	}
	if b, err := os.ReadFile(w.dstImg); err != nil || !bytes.Equal(b, old) {
		t.Fatalf("existing image after the refusal: %q, %v", b, err)
	}
	if w.drv.dest != "" || w.drv.source != "running" {
		t.Fatalf("destination %q, source %q", w.drv.dest, w.drv.source)
	}
}

// TestProvenFinal: a strategy that proves the copy itself (the chunked
// engine) is not re-hashed by the hosts.
func TestProvenFinal(t *testing.T) {
	w := newWorld(t, "web1")
	w.disk.track, w.disk.proven = false, true
	rep, err := Run(context.Background(), w.plan)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range w.ev.get() {
		if strings.HasPrefix(e, "source: hash") || strings.HasPrefix(e, "dest: hash") {
			t.Errorf("hosts hashed although the strategy proved the copy: %q", e)
		}
	}
	if !rep.DigestMatch || rep.Digest != fmt.Sprintf("%x", []byte("01234567")) {
		t.Fatalf("digest %q match %v", rep.Digest, rep.DigestMatch)
	}
}

// TestBandwidthSplit: the budget has one owner. The disk strategy gets a
// token bucket at the whole budget; while the memory copy runs, the
// driver's cap follows what the disk stream leaves (never under a
// quarter); a strategy that cannot count its bytes leaves the driver's
// cap alone.
func TestBandwidthSplit(t *testing.T) {
	defer func(d time.Duration) { shareInterval = d }(shareInterval)
	shareInterval = 50 * time.Millisecond
	w := newWorld(t, "web1")
	total := w.plan.Limits.Bandwidth.BytesPerSecond() // 12.5 MB/s
	w.drv.memory = 800 * time.Millisecond
	// The disk stream sends 60% of the budget while the memory copy runs.
	stop := make(chan struct{})
	go func() {
		<-w.drv.inMig
		t0, base := time.Now(), w.disk.sent.Load()
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				w.disk.sent.Store(base + int64(float64(total)*0.6*time.Since(t0).Seconds()))
			}
		}
	}()
	_, err := Run(context.Background(), w.plan)
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	if w.disk.limit == nil || uint64(w.disk.limit.Limit()) != total {
		t.Fatalf("disk limiter %v, want the whole budget %d B/s", w.disk.limit, total)
	}
	w.drv.mu.Lock()
	calls := slices.Clone(w.drv.bwCalls)
	w.drv.mu.Unlock()
	if len(calls) == 0 {
		t.Fatal("the memory stream's cap never followed the disk stream")
	}
	for _, c := range calls {
		if c < total/4 || c > total {
			t.Errorf("memory cap %d outside [%d, %d]", c, total/4, total)
		}
	}
	// 40% left, measured over ticks on a busy machine: 30-55% at some point.
	if !slices.ContainsFunc(calls, func(c uint64) bool { return c >= total*3/10 && c <= total*55/100 }) {
		t.Errorf("memory caps %v B/s with the disk at 60%% of %d B/s", calls, total)
	}

	n := newWorld(t, "web2")
	n.disk.noCount = true
	n.drv.memory = 100 * time.Millisecond
	if _, err := Run(context.Background(), n.plan); err != nil {
		t.Fatal(err)
	}
	if len(n.drv.bwCalls) != 0 {
		t.Fatalf("cap changed without a disk count: %v", n.drv.bwCalls)
	}
}

// TestPlanChecked: a plan without what every migration needs is refused
// before anything runs, naming the fields.
func TestPlanChecked(t *testing.T) {
	w := newWorld(t, "web1")
	w.plan.Disk, w.plan.DestWAN = nil, netip.Addr{}
	_, err := Run(context.Background(), w.plan)
	if err == nil || !strings.Contains(err.Error(), "missing Disk, DestWAN") {
		t.Fatalf("err = %v", err)
	}
	if ev := w.ev.get(); len(ev) != 0 {
		t.Fatalf("a refused plan acted: %v", ev)
	}
}

// TestRunNoRedirect: with NoRedirect the VM still moves and DNS flips, but
// the source's redirect is never switched on (the benchmark's DNS-only
// mode), and the disk is still proven inside the pause.
func TestRunNoRedirect(t *testing.T) {
	w := newWorld(t, "web1")
	w.plan.NoRedirect = true
	rep, err := Run(context.Background(), w.plan)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range w.ev.get() {
		if e == "source: redirect on=true" {
			t.Fatalf("redirect switched on with NoRedirect: %v", w.ev.get())
		}
	}
	if w.src.redirect == "on" || !rep.DigestMatch {
		t.Fatalf("redirect %q, digest match %v", w.src.redirect, rep.DigestMatch)
	}
	if !slices.Contains(w.ev.get(), "dns: flip") {
		t.Fatalf("dns not flipped: %v", w.ev.get())
	}
}
