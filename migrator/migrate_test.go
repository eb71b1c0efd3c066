package migrator_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/guest"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

func TestMain(m *testing.M) {
	lab.RunChild()
	os.Exit(m.Run())
}

func spec(t *testing.T) *config.Migration {
	t.Helper()
	m, err := config.LoadMigration("../configs/lab-migration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func setup(t *testing.T) (*lab.Lab, *lab.VM, *migrator.Plan) {
	t.Helper()
	return setupWith(t, lab.VMConfig{})
}

func setupWith(t *testing.T, vmc lab.VMConfig) (*lab.Lab, *lab.VM, *migrator.Plan) {
	t.Helper()
	return setupSpec(t, vmc, spec(t))
}

// setupSpec boots the lab guest (vmc) and plans its migration under m.
func setupSpec(t *testing.T, vmc lab.VMConfig, m *config.Migration) (*lab.Lab, *lab.VM, *migrator.Plan) {
	t.Helper()
	labtest.RequireTools(t, "tcpdump")
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartVM(ctx, vmc)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitGuest(ctx, vm.IP, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	p, err := labrun.Plan(ctx, l, vm, m, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { labrun.Cleanup(p) })
	return l, vm, p
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) { w.t.Log(string(b)); return len(b), nil }

func verify(t *testing.T, l *lab.Lab, from string, ip netip.Addr, acked uint64) guest.Report {
	t.Helper()
	rep, err := l.GuestVerify(context.Background(), from, ip, acked)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func svcA(t *testing.T, l *lab.Lab) string {
	t.Helper()
	r, err := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("svc: %v %v", r, err)
	}
	return r.Answer[0].(*dns.A).A.String()
}

// TestMigration moves the lab guest, with its disk writer running and a
// client talking to it, from site A to site B, and checks everything a user
// would: the client's connection never broke, the guest did not reboot,
// every acknowledged disk write is on the destination disk, DNS points at
// the new address, both addresses reach the VM.
func TestMigration(t *testing.T) {
	l, vm, p := setup(t)
	ctx := context.Background()
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	// Datagrams sent inside the pause, after the switch, must wait in the
	// destination's tap and be answered once the VM runs there.
	udp, err := l.Dialer(lab.Client)(ctx, "udp", netip.AddrPortFrom(lab.OldIP, 7).String())
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	const inPause = 5
	p.OnSwitch = func(context.Context) error {
		for i := range inPause {
			fmt.Fprintf(udp, "sent in the pause %d", i)
		}
		return nil
	}
	timeouts := func() int64 { return tcpTimeouts(t, l) }
	timeoutsBefore := timeouts()
	probe := &labrun.Probe{L: l, Target: netip.AddrPortFrom(lab.OldIP, 7), Interval: 10 * time.Millisecond}
	pctx, stopProbe := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { probe.Run(pctx); close(done) }()
	time.Sleep(time.Second)

	migStart := time.Now()
	rep, err := migrator.Run(ctx, p)
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	for _, ph := range rep.Phases {
		t.Logf("phase %-14s %s", ph.Name, ph.Duration.Round(time.Millisecond))
	}
	t.Logf("redirect on %s after the source stopped (QEMU's event time to the hook)", rep.Runtime.HookLag)
	t.Logf("total %s, pause %s (hook %s), disk %d MiB mirrored, digest %s (read %d MiB), redirected %v",
		rep.Total.Round(time.Millisecond), rep.Pause, rep.Runtime.Hook.Round(time.Millisecond), rep.DiskBytes>>20,
		rep.Digest, rep.DigestRead>>20, rep.Redirected)
	if !rep.DigestMatch {
		t.Fatal("digests did not match")
	}
	if !strings.HasPrefix(rep.Health, "passed") {
		t.Errorf("health check: %q, want passed", rep.Health)
	}
	time.Sleep(2 * time.Second)
	stopProbe()
	<-done
	sent, got, reconnects, d := probe.Result()
	t.Logf("probe: %d sent, %d answered, %d reconnects; disruption %s in %d gaps, longest %s", sent, got, reconnects, d.Total, d.Gaps, d.Longest)
	for _, g := range d.Worst {
		t.Logf("  gap %s at %s into the migration", g.Length.Round(time.Millisecond), g.Start.Sub(migStart).Round(time.Millisecond))
	}
	if reconnects != 0 || got != sent {
		t.Errorf("client connection broke: %d reconnects, %d of %d answered", reconnects, got, sent)
	}

	t.Logf("client TCP retransmission timeouts during the migration: %d", timeouts()-timeoutsBefore)
	echoed := map[string]bool{}
	buf := make([]byte, 100)
	udp.SetReadDeadline(time.Now().Add(5 * time.Second))
	for len(echoed) < inPause {
		n, err := udp.Read(buf)
		if err != nil {
			break
		}
		echoed[string(buf[:n])] = true
	}
	if len(echoed) != inPause {
		t.Errorf("of %d datagrams sent while the VM was paused, %d came back: the tap did not hold them", inPause, len(echoed))
	}

	after, err := l.GuestStatus(ctx, lab.Client, lab.NewIP)
	if err != nil {
		t.Fatalf("guest via new ip: %v", err)
	}
	if after.BootID != before.BootID || after.Counter <= before.Counter || after.DiskErrors != 0 {
		t.Fatalf("guest after: %+v, before: %+v", after, before)
	}
	if g := labrun.CheckGuest(ctx, l, lab.NewIP, before); !g.OK() {
		t.Fatalf("guest at site B: %s", g.Problem)
	}
	if _, err := l.GuestStatus(ctx, lab.Client, lab.OldIP); err != nil {
		t.Fatalf("guest via old ip after the move: %v", err)
	}
	if r := verify(t, l, lab.Client, lab.NewIP, after.DiskAcked); !r.OK() || r.Checked == 0 {
		t.Fatalf("disk records at site B: %+v", r)
	}
	if got := svcA(t, l); got != lab.NewIP.String() {
		t.Fatalf("svc.example. = %s, want %s", got, lab.NewIP)
	}
	// After the move the TTL is back to what it was before prepare.
	if r, err := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA); err != nil || r.Answer[0].Header().Ttl != lab.SvcTTL {
		t.Errorf("svc.example. after the move: %v, %v; want TTL %d restored", r, err, lab.SvcTTL)
	}
	// The old host no longer runs the VM.
	if pids, _ := os.ReadFile(vm.Machine.PidFile); len(pids) > 0 {
		pid, _ := strconv.Atoi(string(pids[:len(pids)-1]))
		if syscall.Kill(pid, 0) == nil {
			time.Sleep(2 * time.Second)
			if syscall.Kill(pid, 0) == nil {
				t.Errorf("source QEMU %d still running", pid)
			}
		}
	}

	pausedVMHoldsSegments(t, l, p)

	// Drain: the probe stopped, so old flows are idle; the redirect goes.
	p.DrainIdle = time.Second
	if took, err := migrator.Drain(ctx, p); err != nil || took > 10*time.Second {
		t.Fatalf("drain: %v after %s", err, took)
	}
	if _, err := l.GuestStatus(ctx, lab.Client, lab.NewIP); err != nil {
		t.Fatalf("guest via new ip after drain: %v", err)
	}
}

// TestFailedMigrationLeavesSourceRunning: the destination dies during the
// memory copy; the VM must keep running on the source with its disk intact,
// DNS unchanged, and no redirect left.
func TestFailedMigrationLeavesSourceRunning(t *testing.T) {
	l, vm, p := setup(t)
	ctx := context.Background()
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	progress := make(chan hypervisor.Progress, 100)
	p.Progress = progress
	go func() {
		for pr := range progress {
			if pr.Transferred > 16<<20 {
				b, _ := os.ReadFile(l.Path("vm-siteB.pid"))
				pid, _ := strconv.Atoi(string(b[:max(0, len(b)-1)]))
				if pid > 0 {
					syscall.Kill(pid, syscall.SIGKILL)
				}
				return
			}
		}
	}()
	_, err = migrator.Run(ctx, p)
	close(progress)
	if !errors.Is(err, hypervisor.ErrDestinationFailed) {
		t.Fatalf("err = %v, want destination failure", err)
	}
	t.Logf("failed as expected: %v", err)
	s, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil || s.BootID != before.BootID || s.DiskErrors != 0 {
		t.Fatalf("source guest after failure: %+v, %v", s, err)
	}
	time.Sleep(500 * time.Millisecond)
	s2, _ := l.GuestStatus(ctx, lab.Client, vm.IP)
	if s2.DiskAcked <= s.DiskAcked {
		t.Errorf("source guest's disk writer stalled: %d then %d", s.DiskAcked, s2.DiskAcked)
	}
	if r := verify(t, l, lab.Client, vm.IP, s2.DiskAcked); !r.OK() {
		t.Fatalf("source disk after failure: %+v", r)
	}
	if got := svcA(t, l); got != lab.OldIP.String() {
		t.Fatalf("DNS changed by a failed migration: %s", got)
	}
	r, _ := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA)
	if ttl := r.Answer[0].Header().Ttl; ttl != lab.SvcTTL {
		t.Errorf("TTL after failed migration %d, want the original %d", ttl, lab.SvcTTL)
	}
	// No redirect is left on host A: its counters show nothing redirected.
	if dp, err := p.Source.(*migrator.Host).Datapath(); err == nil {
		if c, err := dp.Stats(lab.OldIP); err == nil && c["encap_packets"] != 0 {
			t.Errorf("packets were redirected during a failed migration: %v", c)
		}
	}
}

// TestHealthCheckFailureKeepsSource: the destination guest is stopped as
// soon as it resumes. The migration fails with its own exit code and
// words, the source VM is kept paused (not quit), DNS is not flipped; and
// Fallback brings the VM back to the source, alive and intact.
func TestHealthCheckFailureKeepsSource(t *testing.T) {
	l, vm, p := setup(t)
	ctx := context.Background()
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	p.Health.Deadline = 5 * time.Second
	stopped := false
	p.OnResumed = func(ctx context.Context) error {
		stopped = true
		return labrun.QEMU(p).Destination().Execute(ctx, "stop", nil, nil)
	}
	rep, err := migrator.Run(ctx, p)
	if !stopped {
		t.Fatalf("the destination never ran: %v", err)
	}
	t.Logf("migration error: %v", err)
	if code := migrator.ExitCode(err); code != 4 {
		t.Fatalf("exit code %d, want 4 (moved, VM not answering)", code)
	}
	for _, words := range []string{"moved, but the VM does not answer at the destination", "tcp 10.2.0.10:7", "kept paused", "To fall back"} {
		if !strings.Contains(err.Error(), words) {
			t.Errorf("error does not say %q: %v", words, err)
		}
	}
	if !rep.SourceKept || !strings.Contains(rep.Health, "does not answer") {
		t.Errorf("report: source kept %v, health %q", rep.SourceKept, rep.Health)
	}
	var st struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := labrun.QEMU(p).Source().Execute(ctx, "query-status", nil, &st); err != nil || st.Running {
		t.Fatalf("source QEMU: %+v, %v; want it kept, paused", st, err)
	}
	t.Logf("source QEMU kept in state %q", st.Status)
	if got := svcA(t, l); got != lab.OldIP.String() {
		t.Fatalf("DNS flipped to %s for a VM that does not answer", got)
	}
	for _, ph := range rep.Phases {
		if ph.Name == "dns-flip" || ph.Name == "source-cleanup" {
			t.Errorf("phase %s ran after a failed health check", ph.Name)
		}
	}

	if err := migrator.Fallback(ctx, p); err != nil {
		t.Fatalf("fallback: %v", err)
	}
	if err := l.WaitGuest(ctx, vm.IP, 20*time.Second); err != nil {
		t.Fatalf("guest at site A after fallback: %v", err)
	}
	g := labrun.CheckGuest(ctx, l, vm.IP, before)
	t.Logf("guest after fallback: %+v", g)
	if !g.OK() {
		t.Fatalf("guest after fallback: %s", g.Problem)
	}
}

// TestDiskBytesOnTheWire: a 1 GiB sparse disk with 256 MiB written goes
// over the WAN in no more than 1.05 x (allocated + rewritten) bytes, and
// arrives exact.
func TestDiskBytesOnTheWire(t *testing.T) {
	l, vm, p := setupWith(t, lab.VMConfig{DiskSize: units.GiB, Prefill: 256 * units.MiB})
	ctx := context.Background()
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	allocated, err := storage.Allocated(vm.Machine.Disk)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := migrator.Run(ctx, p)
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	after, err := l.GuestStatus(ctx, lab.Client, lab.NewIP)
	if err != nil {
		t.Fatal(err)
	}
	rewritten := int64(after.DiskAcked-before.DiskAcked+1) * guest.RecordSize
	limit := float64(allocated+rewritten) * 1.05
	t.Logf("allocated %d MiB, rewritten %d KiB, sent %d MiB (%.3f x), limit %.0f MiB; digest %s, %d chunks re-hashed in the pause",
		allocated>>20, rewritten>>10, rep.DiskWire>>20, float64(rep.DiskWire)/float64(allocated+rewritten), limit/(1<<20), rep.Digest, rep.VerifyChunks)
	if !rep.DigestMatch || rep.DiskWire < allocated || float64(rep.DiskWire) > limit {
		t.Fatalf("disk: %d bytes on the wire for %d allocated + %d rewritten (digest match %v)", rep.DiskWire, allocated, rewritten, rep.DigestMatch)
	}
}

// cutWAN takes site A's WAN link down after a while, for a while, and
// says when (from now) it went down.
func cutWAN(l *lab.Lab, after, length time.Duration) <-chan time.Duration {
	ctx, start := context.Background(), time.Now()
	cut := make(chan time.Duration, 1)
	go func() {
		time.Sleep(after)
		at := time.Since(start)
		netns.Run(ctx, l.NS(lab.WAN), "ip", "link", "set", "a0", "down")
		time.Sleep(length)
		netns.Run(ctx, l.NS(lab.WAN), "ip", "link", "set", "a0", "up")
		cut <- at
	}()
	return cut
}

// phase is how long the named phase took.
func phase(rep migrator.Report, name string) time.Duration {
	for _, ph := range rep.Phases {
		if ph.Name == name {
			return ph.Duration
		}
	}
	return 0
}

// tcpTimeouts reads TcpExt TCPTimeouts (retransmission timeouts) in the
// client's namespace.
func tcpTimeouts(t *testing.T, l *lab.Lab) int64 {
	t.Helper()
	out, err := netns.Run(context.Background(), l.NS(lab.Client), "cat", "/proc/net/netstat")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(out, "\n")
	for i := 0; i+1 < len(lines); i += 2 {
		names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		for j := range names {
			if names[j] == "TCPTimeouts" && j < len(vals) {
				n, _ := strconv.ParseInt(vals[j], 10, 64)
				return n
			}
		}
	}
	t.Fatal("no TCPTimeouts in /proc/net/netstat")
	return 0
}

// TestWANCutDuringBulk: site A's WAN link goes down for 10 s while the
// disk is being copied, longer than the relay's stall limit (5 s): the WAN
// connection under the mirror is given up, QEMU's NBD client reconnects
// through the relay once the link is back, and the mirror job carries on
// from its own dirty bitmap: the copy completes, exact, sending about the
// image's data once, not twice.
func TestWANCutDuringBulk(t *testing.T) {
	l, vm, p := setupWith(t, lab.VMConfig{DiskSize: units.GiB, Prefill: 256 * units.MiB})
	ctx := context.Background()
	allocated, err := storage.Allocated(vm.Machine.Disk)
	if err != nil {
		t.Fatal(err)
	}
	cut := cutWAN(l, 6*time.Second, 10*time.Second) // well inside the ~25 s bulk copy
	rep, err := migrator.Run(ctx, p)
	if err != nil {
		t.Fatalf("migrate across a WAN cut: %v", err)
	}
	at := <-cut
	bulk := phase(rep, "disk-bulk")
	t.Logf("cut at %s for 10s; disk-bulk took %s; %d reconnects; sent %d MiB for %d MiB allocated; digest match %v",
		at.Round(time.Millisecond), bulk.Round(time.Millisecond), rep.DiskCuts, rep.DiskWire>>20, allocated>>20, rep.DigestMatch)
	if !rep.DigestMatch {
		t.Fatal("digests differ")
	}
	if float64(rep.DiskWire) > 1.05*float64(allocated)+float64(4<<20) {
		t.Fatalf("sent %d bytes for %d allocated: the copy restarted", rep.DiskWire, allocated)
	}
	if bulk < 16*time.Second {
		t.Fatalf("disk-bulk took %s: the cut at %s did not fall inside it", bulk, at)
	}
	if rep.DiskCuts < 1 {
		t.Fatal("the relay did not give up the stalled WAN connection: no reconnect")
	}
}

// TestChunkedMigrationAcrossWANCut moves the guest with the chunked engine
// (the path for disks without hypervisor dirty tracking) while its disk
// writer runs, and cuts site A's WAN link for 8 s during the bulk round:
// longer than the engine's stall limit, so the connection breaks and a new
// one resumes from the destination's manifest. Every acknowledged record
// must be at site B, the digests equal, the bytes on the wire within 1.05 x
// (allocated + rewritten), the link's budget respected.
func TestChunkedMigrationAcrossWANCut(t *testing.T) {
	m := spec(t)
	m.Storage.Mode = "chunked"
	l, vm, p := setupSpec(t, lab.VMConfig{DiskSize: units.GiB, Prefill: 256 * units.MiB}, m)
	ctx := context.Background()
	if p.Disk.Name() != "chunked" {
		t.Fatal("storage.mode chunked did not select the chunked engine")
	}
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	allocated, err := storage.Allocated(vm.Machine.Disk)
	if err != nil {
		t.Fatal(err)
	}
	cut := cutWAN(l, 8*time.Second, 8*time.Second) // inside the ~25 s bulk round
	rep, err := migrator.Run(ctx, p)
	if err != nil {
		t.Fatalf("migrate: %v", err)
	}
	at := <-cut
	for _, ph := range rep.Phases {
		t.Logf("phase %-14s %s", ph.Name, ph.Duration.Round(time.Millisecond))
	}
	rounds := phase(rep, "disk-bulk")
	after, err := l.GuestStatus(ctx, lab.Client, lab.NewIP)
	if err != nil {
		t.Fatal(err)
	}
	rewritten := int64(after.DiskAcked-before.DiskAcked+1) * guest.RecordSize
	t.Logf("cut at %s for 8s; %d rounds, %d cuts, live rounds took %s; sent %d MiB for %d MiB allocated + %d KiB rewritten (%.3f x); pause %s, %d chunks in it; digest %s",
		at.Round(time.Millisecond), rep.DiskRounds, rep.DiskCuts, rounds.Round(time.Millisecond), rep.DiskWire>>20, allocated>>20, rewritten>>10,
		float64(rep.DiskWire)/float64(allocated+rewritten), rep.Pause, rep.VerifyChunks, rep.Digest)
	if !rep.DigestMatch || rep.DiskRounds < 2 {
		t.Fatalf("digest match %v after %d rounds", rep.DigestMatch, rep.DiskRounds)
	}
	if rep.DiskCuts < 1 || rounds < 16*time.Second {
		t.Fatalf("the cut at %s (%d connection cuts) did not fall inside the %s of live rounds", at, rep.DiskCuts, rounds)
	}
	if float64(rep.DiskWire) > 1.05*float64(allocated+rewritten) {
		t.Fatalf("sent %d bytes for %d allocated + %d rewritten: the copy restarted", rep.DiskWire, allocated, rewritten)
	}
	// 100 Mbit/s budget: the bytes cannot have gone faster than it allows.
	if min := time.Duration(float64(rep.DiskWire) / float64(m.Limits.Bandwidth.BytesPerSecond()) * float64(time.Second)); rounds < min {
		t.Fatalf("%d bytes in %s: faster than the %s budget", rep.DiskWire, rounds, m.Limits.Bandwidth)
	}
	if after.BootID != before.BootID || after.DiskErrors != 0 {
		t.Fatalf("guest after: %+v, before: %+v", after, before)
	}
	if r := verify(t, l, lab.Client, lab.NewIP, after.DiskAcked); !r.OK() || r.Checked == 0 {
		t.Fatalf("disk records at site B: %+v", r)
	}
}

// pausedVMHoldsSegments: with the VM at site B and the redirect on, the VM
// is stopped (as it is before it resumes at the switch) while the client
// sends on a TCP connection to the old address; after 100 ms it runs
// again. The segments must have waited in the tap: the echo comes back
// before the client's retransmission timeout, and none fires (a lost
// segment is only recovered by the RTO: the tail-loss probe sent before
// it is lost too while the VM is stopped).
func pausedVMHoldsSegments(t *testing.T, l *lab.Lab, p *migrator.Plan) {
	t.Helper()
	ctx := context.Background()
	c, err := l.Dialer(lab.Client)(ctx, "tcp", netip.AddrPortFrom(lab.OldIP, 7).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := bytes.Repeat([]byte("held in the tap "), 64) // 1 KiB
	echo := func(n int) time.Duration {
		t0 := time.Now()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, n*len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, bytes.Repeat(msg, n)) {
			t.Fatalf("echo: %v (%q...)", err, got[:min(32, len(got))])
		}
		return time.Since(t0)
	}
	c.Write(msg)
	echo(1)
	before, rtoBefore := tcpInfo(t, c), tcpTimeouts(t, l)
	dst := labrun.QEMU(p).Destination()
	if err := dst.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	const segments = 3
	t0 := time.Now()
	for range segments {
		c.Write(msg)
	}
	// Longer than the client's tail-loss probe (2 RTTs), well under its
	// RTO (over 200 ms): a lost segment could only come back by the RTO.
	const stopped = 100 * time.Millisecond
	time.Sleep(stopped)
	if err := dst.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	echo(segments)
	took := time.Since(t0)
	after, rtos := tcpInfo(t, c), tcpTimeouts(t, l)-rtoBefore
	rto := time.Duration(after.Rto) * time.Microsecond
	t.Logf("VM stopped %s at site B: %d segments echoed %s after sending; client RTO %s; retransmission timeouts %d, segments resent %d (tail-loss probes)",
		stopped, segments, took.Round(time.Millisecond), rto, rtos, after.Total_retrans-before.Total_retrans)
	if rtos != 0 || took >= rto {
		t.Fatalf("%d retransmission timeouts, echo after %s (RTO %s): the paused VM's tap lost segments", rtos, took, rto)
	}
}

func tcpInfo(t *testing.T, c net.Conn) *unix.TCPInfo {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	raw.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// TestDigestMismatchLeavesSourceRunning: the destination image is damaged
// inside the pause, before the final comparison (without a relay the pause
// hashes both images whole). The migration must refuse to resume the
// destination: the VM runs on at the source, its disk intact, DNS as it
// was, no redirect left.
func TestDigestMismatchLeavesSourceRunning(t *testing.T) {
	l, vm, p := setup(t)
	ctx := context.Background()
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	md := p.Disk.(*qemu.MirrorDisk)
	md.Relay = nil // QEMU's own NBD over TLS; the pause compares whole images
	md.NBDListen = netip.AddrPortFrom(lab.HostB, labrun.NBDPort)
	p.OnSwitch = func(context.Context) error {
		f, err := os.OpenFile(p.DestDisk, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = f.WriteAt([]byte("damaged at the destination"), 100<<20)
		return err
	}
	rep, err := migrator.Run(ctx, p)
	if err == nil || !strings.Contains(err.Error(), "digest mismatch") {
		t.Fatalf("err = %v, want a digest mismatch", err)
	}
	t.Logf("refused: %v (digest match %v)", err, rep.DigestMatch)
	// Reaching the guest at the old address also shows the redirect, on
	// inside the pause, is off again: else the request would go to site B.
	s, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil || s.BootID != before.BootID || s.DiskErrors != 0 {
		t.Fatalf("source guest after the refusal: %+v, %v", s, err)
	}
	if r := verify(t, l, lab.Client, vm.IP, s.DiskAcked); !r.OK() {
		t.Fatalf("source disk after the refusal: %+v", r)
	}
	if got := svcA(t, l); got != lab.OldIP.String() {
		t.Fatalf("DNS changed by a refused migration: %s", got)
	}
}
