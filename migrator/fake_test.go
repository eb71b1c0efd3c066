package migrator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/ddns"
	"golang.org/x/time/rate"
)

// Fakes for the core's unit tests: every call is written to one event
// log, in order; the images are real files in a temp dir, hashed by the
// real code (Host.HashImage), so digests are real.

type events struct {
	mu   sync.Mutex
	list []string
}

func (e *events) add(format string, a ...any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.list = append(e.list, fmt.Sprintf(format, a...))
}

func (e *events) get() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.list...)
}

// failSet makes the named call fail.
type failSet map[string]error

var errInjected = errors.New("injected failure")

func (f failSet) check(name string) error {
	if err, ok := f[name]; ok {
		if err == nil {
			err = errInjected
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// fakeSource is host A: the redirect's state and its image.
type fakeSource struct {
	ev       *events
	fail     failSet
	host     Host   // real image hashing
	redirect string // "" none, "off", "on"
	tunnels  int    // accepted, not retired
}

func (s *fakeSource) PrepareSource(_ context.Context, req SourcePrepare) (TunnelEnd, error) {
	s.ev.add("source: prepare (peer %s, %s)", req.Tunnel.Peer, req.OldIP)
	if err := s.fail.check("source-prepare"); err != nil {
		return TunnelEnd{}, err
	}
	if req.Tunnel.Token == 0 {
		return TunnelEnd{}, errors.New("source: tunnel without a token")
	}
	if req.Tunnel.Key != "dest-key" || req.Tunnel.Port != 2 {
		return TunnelEnd{}, fmt.Errorf("source: the destination's end not passed on: %+v", req.Tunnel)
	}
	s.redirect, s.tunnels = "off", s.tunnels+1
	return TunnelEnd{Continuity: "test", Key: "source-key", Port: 1}, nil
}

func (s *fakeSource) RetireTunnel(context.Context, Tunnel) error {
	s.tunnels--
	return nil
}

func (s *fakeSource) SetRedirect(_ context.Context, req RedirectSwitch) error {
	s.ev.add("source: redirect on=%v", req.On)
	s.redirect = map[bool]string{true: "on", false: "off"}[req.On]
	return nil
}

func (s *fakeSource) RemoveRedirect(context.Context, RedirectRemove) error {
	s.ev.add("source: redirect removed")
	s.redirect = ""
	return nil
}

func (s *fakeSource) RedirectState(context.Context, RedirectQuery) (RedirectState, error) {
	s.ev.add("source: redirect state")
	return RedirectState{Counters: map[string]uint64{"encap_packets": 3}, Idle: time.Hour, Seen: true}, nil
}

func (s *fakeSource) StatImage(ctx context.Context, req ImageRef) (ImageInfo, error) {
	return s.host.StatImage(ctx, req)
}

func (s *fakeSource) HeldAddrs(context.Context, AddrQuery) (HeldAddrs, error) {
	return HeldAddrs{Name: "host A", Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}}, nil
}

func (s *fakeSource) HashImage(ctx context.Context, req HashRequest) (Digests, error) {
	s.ev.add("source: hash whole=%v chunks=%v", req.Whole, req.Chunks)
	return s.host.HashImage(ctx, req)
}

// fakeDest is host B: the VM entry, and its image through a real Host
// (CreateImage's refusal, Abort's removal).
type fakeDest struct {
	ev      *events
	fail    failSet
	host    Host
	vm      bool
	peer    netip.Addr // the VM entry's tunnel peer
	tunnels int        // accepted, not retired
}

func (d *fakeDest) PrepareDestination(_ context.Context, req DestPrepare) (TunnelEnd, error) {
	d.ev.add("dest: prepare")
	if err := d.fail.check("dest-prepare"); err != nil {
		return TunnelEnd{}, err
	}
	if req.Tunnel.Token == 0 {
		return TunnelEnd{}, errors.New("dest: tunnel without a token")
	}
	d.tunnels++
	return TunnelEnd{Continuity: "test", Key: "dest-key", Port: 2}, nil
}

func (d *fakeDest) CreateImage(ctx context.Context, req ImageCreate) error {
	d.ev.add("dest: create image")
	return d.host.CreateImage(ctx, req)
}

func (d *fakeDest) AttachVM(_ context.Context, req VMAttach) error {
	d.ev.add("dest: attach vm (peer %v)", req.Tunnel.Peer.IsValid())
	if err := d.fail.check("dest-attach"); err != nil {
		return err
	}
	if req.Tunnel.Peer.IsValid() && (req.Tunnel.Key != "source-key" || req.Tunnel.Port != 1 || req.Tunnel.Continuity != "test") {
		return fmt.Errorf("dest: the source's end not passed on: %+v", req.Tunnel)
	}
	d.vm, d.peer = true, req.Tunnel.Peer
	return nil
}

func (d *fakeDest) RetireTunnel(context.Context, Tunnel) error {
	d.tunnels--
	return nil
}

func (d *fakeDest) HeldAddrs(context.Context, AddrQuery) (HeldAddrs, error) {
	return HeldAddrs{Name: "host B", Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.2")}}, nil
}

func (d *fakeDest) HashImage(ctx context.Context, req HashRequest) (Digests, error) {
	d.ev.add("dest: hash whole=%v chunks=%v", req.Whole, req.Chunks)
	return d.host.HashImage(ctx, req)
}

func (d *fakeDest) Abort(ctx context.Context, req DestAbort) error {
	d.ev.add("dest: abort")
	d.vm = false
	return d.host.Abort(ctx, req)
}

// fakeDriver plays a hypervisor: the source runs until the pause; the
// hook runs with it paused; a failure leaves it running.
type fakeDriver struct {
	ev      *events
	fail    failSet
	source  string        // "running", "paused", "stopped"
	dest    string        // "", "incoming", "running"
	hold    chan struct{} // if set, Migrate waits for it before the pause
	inMig   chan struct{} // closed when Migrate starts
	memory  time.Duration // pre-copy time before the pause
	stall   bool          // Migrate reports progress that never advances until cancelled
	mu      sync.Mutex
	bwCalls []uint64
}

func newDriver(ev *events) *fakeDriver {
	return &fakeDriver{ev: ev, fail: failSet{}, source: "running", inMig: make(chan struct{})}
}

func (d *fakeDriver) PrepareDestination(context.Context) error {
	d.ev.add("driver: prepare destination")
	if err := d.fail.check("driver-prepare"); err != nil {
		return err
	}
	d.dest = "incoming"
	return nil
}

func (d *fakeDriver) Migrate(ctx context.Context, _ hypervisor.Options, progress chan<- hypervisor.Progress, hook hypervisor.Switchover) (hypervisor.Result, error) {
	d.ev.add("driver: migrate")
	close(d.inMig)
	if d.hold != nil {
		<-d.hold
	}
	for i := 0; d.stall; i++ {
		select {
		case progress <- hypervisor.Progress{Status: "active", Transferred: 1 << 20, Total: 4 << 20, Iteration: 1}:
		default:
		}
		select {
		case <-ctx.Done():
			d.ev.add("driver: cancelled, source running")
			return hypervisor.Result{}, fmt.Errorf("%w: %v", hypervisor.ErrCancelled, context.Cause(ctx))
		case <-time.After(5 * time.Millisecond):
		}
	}
	time.Sleep(d.memory)
	if err := d.fail.check("migrate"); err != nil {
		return hypervisor.Result{}, fmt.Errorf("%w: %v", hypervisor.ErrNotConverging, err)
	}
	d.source = "paused"
	d.ev.add("driver: source paused")
	if err := hook(ctx); err != nil {
		d.source = "running"
		d.ev.add("driver: source resumed")
		return hypervisor.Result{}, fmt.Errorf("%w: %v", hypervisor.ErrSwitchover, err)
	}
	if err := d.fail.check("destination-resume"); err != nil {
		d.source = "running"
		d.ev.add("driver: source resumed")
		return hypervisor.Result{}, fmt.Errorf("%w: %v", hypervisor.ErrDestinationFailed, err)
	}
	d.source, d.dest = "stopped", "running"
	d.ev.add("driver: destination running")
	return hypervisor.Result{Downtime: 5 * time.Millisecond}, nil
}

// ReportsBytes: the fake's progress carries bytes (the stall watchdog
// watches it).
func (d *fakeDriver) ReportsBytes() bool { return true }

func (d *fakeDriver) ResumeSource(context.Context) error {
	d.ev.add("driver: resume source")
	d.source = "running"
	return nil
}

func (d *fakeDriver) AbortDestination(context.Context) error {
	d.ev.add("driver: abort destination")
	d.dest = ""
	return nil
}

func (d *fakeDriver) StopSource(context.Context) error {
	d.ev.add("driver: stop source")
	d.source = "quit"
	return nil
}

func (d *fakeDriver) SetBandwidth(_ context.Context, bps uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.bwCalls = append(d.bwCalls, bps)
	return nil
}

// fakeDisk copies the source image to the destination's for real: whole
// in Bulk, again in Final (the last delta).
type fakeDisk struct {
	ev       *events
	fail     failSet
	src, dst string
	track    bool
	proven   bool // Final proves the copy itself (as the chunked engine)
	damage   bool // Final leaves the destination different
	limit    *rate.Limiter
	sent     atomic.Int64
	noCount  bool // Sent returns -1
	released bool
}

func (f *fakeDisk) Name() string { return "fake" }

func (f *fakeDisk) copy() error {
	in, err := os.Open(f.src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(f.dst, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	n, err := io.Copy(out, in)
	f.sent.Add(n)
	return errors.Join(err, out.Close())
}

func (f *fakeDisk) Bulk(_ context.Context, limit *rate.Limiter, progress func(storage.BulkProgress)) error {
	f.ev.add("disk: bulk")
	f.limit = limit
	if err := f.fail.check("bulk"); err != nil {
		return err
	}
	if progress != nil {
		progress(storage.BulkProgress{Done: 1, Total: 1})
	}
	return f.copy()
}

func (f *fakeDisk) Prehash(context.Context) (bool, error) {
	f.ev.add("disk: prehash")
	return f.track, f.fail.check("prehash")
}

func (f *fakeDisk) Final(context.Context) (storage.FinalDelta, error) {
	f.ev.add("disk: final")
	if err := f.fail.check("final"); err != nil {
		return storage.FinalDelta{}, err
	}
	if err := f.copy(); err != nil {
		return storage.FinalDelta{}, err
	}
	if f.damage {
		out, err := os.OpenFile(f.dst, os.O_WRONLY, 0)
		if err != nil {
			return storage.FinalDelta{}, err
		}
		out.WriteAt([]byte("damaged"), 4096)
		out.Close()
	}
	switch {
	case f.proven:
		return storage.FinalDelta{Proven: true, Digest: []byte("0123456789abcdef")}, nil
	case f.track:
		return storage.FinalDelta{Chunks: []int64{0}}, nil
	}
	return storage.FinalDelta{Whole: true}, nil
}

func (f *fakeDisk) Release(context.Context) error {
	f.ev.add("disk: release")
	f.released = true
	return f.fail.check("release")
}

func (f *fakeDisk) Abort(context.Context) error {
	f.ev.add("disk: abort")
	return nil
}

func (f *fakeDisk) Sent() int64 {
	if f.noCount {
		return -1
	}
	return f.sent.Load()
}

func (f *fakeDisk) Stats() storage.StrategyStats {
	return storage.StrategyStats{Wire: f.Sent()}
}

// fakeDNS holds one name's record.
type fakeDNS struct {
	ev   *events
	fail failSet
	rec  ddns.Record
}

func (d *fakeDNS) Show(_ context.Context, zone, name string) (ddns.State, error) {
	return ddns.State{Zone: zone, Name: name, Records: []ddns.Record{d.rec}}, nil
}

func (d *fakeDNS) Prepare(_ context.Context, zone, name string, ttl uint32) (ddns.Result, error) {
	d.ev.add("dns: prepare ttl %d", ttl)
	before := ddns.State{Zone: zone, Name: name, Records: []ddns.Record{d.rec}}
	d.rec.TTL = ttl
	return ddns.Result{Before: before, After: ddns.State{Records: []ddns.Record{d.rec}}, Changed: true}, nil
}

func (d *fakeDNS) Flip(_ context.Context, _, _ string, old, new []netip.Addr, ttl uint32) (ddns.Result, error) {
	d.ev.add("dns: flip")
	if err := d.fail.check("flip"); err != nil {
		return ddns.Result{}, err
	}
	d.rec = ddns.Record{Addr: new[0], TTL: ttl}
	return ddns.Result{After: ddns.State{Records: []ddns.Record{d.rec}}, Changed: true}, nil
}

func (d *fakeDNS) Restore(_ context.Context, _, _ string, ttl uint32) (ddns.Result, error) {
	d.ev.add("dns: restore ttl %d", ttl)
	d.rec.TTL = ttl
	return ddns.Result{}, nil
}

// fakeWorld is one migration's plan over the fakes.
type fakeWorld struct {
	ev     *events
	src    *fakeSource
	dst    *fakeDest
	drv    *fakeDriver
	disk   *fakeDisk
	dns    *fakeDNS
	plan   *Plan
	srcImg string
	dstImg string
}

var (
	oldIP = netip.MustParseAddr("10.1.0.10")
	newIP = netip.MustParseAddr("10.2.0.10")
)

// newWorld makes a 3 MiB source image with data and a plan to move it.
func newWorld(t *testing.T, vm string) *fakeWorld {
	t.Helper()
	dir := t.TempDir()
	w := &fakeWorld{ev: &events{}, srcImg: filepath.Join(dir, "a.raw"), dstImg: filepath.Join(dir, "b.raw")}
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(w.srcImg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	w.src = &fakeSource{ev: w.ev, fail: failSet{}, host: Host{Name: "host A"}}
	w.dst = &fakeDest{ev: w.ev, fail: failSet{}, host: Host{Name: "host B"}}
	w.drv = newDriver(w.ev)
	w.disk = &fakeDisk{ev: w.ev, fail: failSet{}, src: w.srcImg, dst: w.dstImg, track: true}
	w.dns = &fakeDNS{ev: w.ev, fail: failSet{}, rec: ddns.Record{Addr: oldIP, TTL: 300}}
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	gw, _ := net.ParseMAC("52:54:00:00:00:01")
	w.plan = &Plan{
		Label: vm, VM: vm,
		Source: w.src, Dest: w.dst,
		SourceWAN: netip.MustParseAddr("192.0.2.1"), DestWAN: netip.MustParseAddr("192.0.2.2"),
		Driver: w.drv, Disk: w.disk,
		SourceDisk: w.srcImg, DestDisk: w.dstImg, DestTap: "tap-vm",
		Limits: hypervisor.Options{Bandwidth: 100 * units.Mbit, Downtime: 300 * time.Millisecond},
		OldIP:  oldIP, NewIP: newIP, Gateway: netip.MustParseAddr("10.1.0.1"),
		VMMAC: mac, GatewayMAC: gw,
		DNS: w.dns, Zone: "example.", DNSName: "svc.example.", TTL: 5,
		DrainIdle: time.Millisecond, DrainTimeout: time.Second,
		Log: discardLog(),
	}
	return w
}

// pauseOrder sorts each pair of neighbouring hash events: the pause
// hashes both hosts' images at once.
func pauseOrder(ev []string) []string {
	for i := 0; i+1 < len(ev); i++ {
		if strings.HasPrefix(ev[i], "dest: hash") && strings.HasPrefix(ev[i+1], "source: hash") {
			ev[i], ev[i+1] = ev[i+1], ev[i]
		}
	}
	return ev
}

func sameEvents(t *testing.T, got, want []string) {
	t.Helper()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("events:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}
