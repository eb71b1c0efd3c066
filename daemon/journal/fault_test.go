package journal

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/ddns"
	"golang.org/x/time/rate"
)

// world is both hosts, the hypervisor and DNS as state a killed vmhopd
// leaves behind, for the fault matrix: every fake reads and writes it
// under one lock.
type world struct {
	mu        sync.Mutex
	source    string // "running", "paused" (pre-switchover), "postmigrate" (completed), "quit"
	migrating bool   // the source's migration runs or waits (not cancelled, not completed)
	dest      string // "", "incoming", "running"
	image     bool   // the destination image exists
	vmEntry   bool   // the destination's VM entry
	redirect  string // "", "off", "on"
	tunnels   int    // accepted on either host, not retired
	dnsAddr   netip.Addr
	dnsTTL    uint32
	// disk: the disk stream (the source's mirror job, the destination's
	// export and stream end) runs: Bulk starts it, Release and Abort end
	// it, and so does recovery's end-disk-stream (Clean).
	disk bool
}

func (w *world) do(f func()) { w.mu.Lock(); f(); w.mu.Unlock() }

// proc is one vmhopd's view of the world: once it is killed, its calls
// change nothing (a dead process acts no more).
type proc struct {
	w    *world
	dead atomic.Bool
}

func (p *proc) do(f func()) {
	p.w.do(func() {
		if !p.dead.Load() {
			f()
		}
	})
}

type wSource struct{ *proc }

func (s wSource) PrepareSource(context.Context, migrator.SourcePrepare) (migrator.TunnelEnd, error) {
	s.do(func() { s.w.redirect, s.w.tunnels = "off", s.w.tunnels+1 })
	return migrator.TunnelEnd{}, nil
}
func (s wSource) SetRedirect(_ context.Context, r migrator.RedirectSwitch) error {
	s.do(func() { s.w.redirect = map[bool]string{true: "on", false: "off"}[r.On] })
	return nil
}
func (s wSource) RemoveRedirect(context.Context, migrator.RedirectRemove) error {
	s.do(func() { s.w.redirect = "" })
	return nil
}
func (s wSource) RetireTunnel(_ context.Context, t migrator.Tunnel) error {
	s.do(func() {
		if t.Token != 0 && s.w.tunnels > 0 {
			s.w.tunnels--
		}
	})
	return nil
}
func (s wSource) RedirectState(context.Context, migrator.RedirectQuery) (migrator.RedirectState, error) {
	return migrator.RedirectState{Idle: time.Hour, Seen: true}, nil
}
func (s wSource) StatImage(context.Context, migrator.ImageRef) (migrator.ImageInfo, error) {
	return migrator.ImageInfo{Size: 1 << 20}, nil
}
func (s wSource) HashImage(context.Context, migrator.HashRequest) (migrator.Digests, error) {
	return migrator.Digests{Root: []byte{1}}, nil
}
func (s wSource) HeldAddrs(context.Context, migrator.AddrQuery) (migrator.HeldAddrs, error) {
	return migrator.HeldAddrs{}, nil
}

type wDest struct{ *proc }

func (d wDest) PrepareDestination(context.Context, migrator.DestPrepare) (migrator.TunnelEnd, error) {
	d.do(func() { d.w.tunnels++ })
	return migrator.TunnelEnd{}, nil
}
func (d wDest) CreateImage(context.Context, migrator.ImageCreate) error {
	d.do(func() { d.w.image = true })
	return nil
}
func (d wDest) AttachVM(context.Context, migrator.VMAttach) error {
	d.do(func() { d.w.vmEntry = true })
	return nil
}
func (d wDest) HashImage(context.Context, migrator.HashRequest) (migrator.Digests, error) {
	return migrator.Digests{Root: []byte{1}}, nil
}
func (d wDest) RetireTunnel(_ context.Context, t migrator.Tunnel) error {
	d.do(func() {
		if t.Token != 0 && d.w.tunnels > 0 {
			d.w.tunnels--
		}
	})
	return nil
}
func (d wDest) Abort(context.Context, migrator.DestAbort) error {
	d.do(func() { d.w.image, d.w.vmEntry = false, false })
	return nil
}
func (d wDest) HeldAddrs(context.Context, migrator.AddrQuery) (migrator.HeldAddrs, error) {
	return migrator.HeldAddrs{}, nil
}

// wDriver plays QEMU with pause-before-switchover: Migrate pauses the
// source and calls the hook; after it the migration completes and the
// destination runs. Abort (a failed hook) cancels and resumes.
type wDriver struct{ *proc }

func (d wDriver) PrepareDestination(context.Context) error {
	d.do(func() { d.w.dest = "incoming" })
	return nil
}
func (d wDriver) Migrate(ctx context.Context, _ hypervisor.Options, _ chan<- hypervisor.Progress, hook hypervisor.Switchover) (hypervisor.Result, error) {
	d.do(func() { d.w.migrating = true })
	d.do(func() { d.w.source = "paused" })
	if err := hook(ctx); err != nil {
		d.do(func() { d.w.migrating, d.w.source = false, "running" })
		return hypervisor.Result{}, fmt.Errorf("%w: %v", hypervisor.ErrSwitchover, err)
	}
	d.do(func() { d.w.migrating, d.w.source, d.w.dest = false, "postmigrate", "running" })
	return hypervisor.Result{}, nil
}
func (d wDriver) ResumeSource(context.Context) error {
	d.do(func() {
		if d.w.source == "paused" || d.w.source == "postmigrate" {
			d.w.source = "running"
		}
	})
	return nil
}
func (d wDriver) AbortDestination(context.Context) error {
	d.do(func() { d.w.dest = "" })
	return nil
}
func (d wDriver) StopSource(context.Context) error {
	d.do(func() { d.w.source = "quit" })
	return nil
}
func (d wDriver) ConnectSource(context.Context) error { return nil }
func (d wDriver) SourceMigrated(context.Context) (bool, error) {
	var m bool
	d.do(func() { m = d.w.source == "postmigrate" })
	return m, nil
}
func (d wDriver) CancelMigration(context.Context) error {
	d.do(func() {
		if d.w.migrating {
			d.w.migrating = false
		}
	})
	return nil
}

type wDNS struct{ *proc }

func (d wDNS) Show(context.Context, string, string) (ddns.State, error) {
	var r ddns.Record
	d.do(func() { r = ddns.Record{Addr: d.w.dnsAddr, TTL: d.w.dnsTTL} })
	return ddns.State{Records: []ddns.Record{r}}, nil
}
func (d wDNS) Prepare(context.Context, string, string, uint32) (ddns.Result, error) {
	var before ddns.Record
	d.do(func() { before = ddns.Record{Addr: d.w.dnsAddr, TTL: d.w.dnsTTL}; d.w.dnsTTL = 1 })
	return ddns.Result{Before: ddns.State{Records: []ddns.Record{before}}, Changed: true}, nil
}
func (d wDNS) Flip(_ context.Context, _, _ string, _, n []netip.Addr, ttl uint32) (ddns.Result, error) {
	d.do(func() { d.w.dnsAddr, d.w.dnsTTL = n[0], ttl })
	return ddns.Result{}, nil
}
func (d wDNS) Restore(_ context.Context, _, _ string, ttl uint32) (ddns.Result, error) {
	d.do(func() { d.w.dnsTTL = ttl })
	return ddns.Result{}, nil
}

type wDisk struct{ *proc }

var _ migrator.DiskCleaner = wDisk{}

func (wDisk) Name() string { return "fake" }
func (d wDisk) Bulk(context.Context, *rate.Limiter, func(storage.BulkProgress)) error {
	d.do(func() { d.w.disk = true })
	return nil
}
func (wDisk) Prehash(context.Context) (bool, error) { return false, nil }
func (wDisk) Final(context.Context) (storage.FinalDelta, error) {
	return storage.FinalDelta{Proven: true, Digest: []byte("0123456789abcdef")}, nil
}
func (d wDisk) Release(context.Context) error { d.do(func() { d.w.disk = false }); return nil }
func (d wDisk) Abort(context.Context) error   { d.do(func() { d.w.disk = false }); return nil }
func (d wDisk) Clean(context.Context) error   { d.do(func() { d.w.disk = false }); return nil }
func (wDisk) Sent() int64                     { return -1 }
func (wDisk) Stats() storage.StrategyStats    { return storage.StrategyStats{} }

var (
	oldIP = netip.MustParseAddr("10.1.0.10")
	newIP = netip.MustParseAddr("10.2.0.10")
)

func (w *world) plan(p *proc) *migrator.Plan {
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	return &migrator.Plan{Label: "web1", VM: fmt.Sprintf("web1-%p", p), Source: wSource{p}, Dest: wDest{p}, Driver: wDriver{p},
		Disk: wDisk{p}, DNS: wDNS{p}, Zone: "example.", DNSName: "svc.example.", TTL: 1,
		SourceDisk: "/a.raw", DestDisk: "/b.raw", SourceWAN: netip.MustParseAddr("192.0.2.1"), DestWAN: netip.MustParseAddr("192.0.2.2"),
		OldIP: oldIP, NewIP: newIP, VMMAC: mac, DrainIdle: time.Millisecond, DrainTimeout: time.Second, StallTimeout: -1}
}

var errKilled = errors.New("killed")

// TestFaultMatrix kills the coordinating vmhopd (its migration stops
// dead: no undo runs) before each phase acts, after it ended, and inside
// the pause, then recovers from what its journal says, with a new plan
// over the same hosts. The end state is always one of the two a
// migration may end in: the VM running on the source alone (disk image
// at the destination gone, DNS and its TTL as they were), or running at
// the destination alone (source quit, DNS flipped, TTL restored); the
// redirect, both tunnels and the disk stream gone either way.
func TestFaultMatrix(t *testing.T) {
	type kill struct {
		phase string
		end   bool
		hook  bool // inside the pause (the switchover hook)
	}
	var kills []kill
	for _, ph := range []string{"datapath", "destination", "disk-bulk", "disk-prehash", "memory", "disk-release",
		"dns-flip", "dns-restore", "source-cleanup", "drain"} {
		kills = append(kills, kill{phase: ph}, kill{phase: ph, end: true})
	}
	kills = append(kills, kill{phase: "memory", hook: true})
	for _, k := range kills {
		name := fmt.Sprintf("%s/%s", k.phase, map[bool]string{false: "start", true: "end"}[k.end])
		if k.hook {
			name = "inside the pause"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel() // the drains wait out the DNS TTL (2 s)
			w := &world{source: "running", dnsAddr: oldIP, dnsTTL: 2}
			s := NewStore(t.TempDir())
			rec := &Record{ID: "web1-0000000" + fmt.Sprint(len(name)%10), Name: "web1", Started: time.Now()}
			if err := s.Write(rec); err != nil {
				t.Fatal(err)
			}
			killed := make(chan struct{})
			dead := make(chan struct{}) // never closed: a killed process does nothing more
			first := &proc{w: w}
			p := w.plan(first)
			var once sync.Once
			kill := func() { once.Do(func() { first.dead.Store(true); close(killed) }) }
			var jmu sync.Mutex // the journal's writes, as Job.OnPhase serialises them
			p.OnPhase = func(_ context.Context, ev migrator.PhaseEvent) error {
				jmu.Lock()
				defer jmu.Unlock()
				if first.dead.Load() {
					<-dead
				}
				rec.Apply(ev, time.Now())
				if err := s.Write(rec); err != nil {
					return err
				}
				if !k.hook && ev.Phase == k.phase && ev.End == k.end {
					kill()
					<-dead
				}
				return nil
			}
			if k.hook {
				p.OnSwitch = func(context.Context) error { kill(); <-dead; return errKilled }
			}
			go func() {
				if _, err := migrator.Run(context.Background(), p); err != nil {
					return
				}
				migrator.Drain(context.Background(), p)
			}()
			select {
			case <-killed:
			case <-time.After(10 * time.Second):
				t.Fatal("the kill point was not reached")
			}
			// A new vmhopd: the record from disk, a plan from the spec.
			left, err := s.Read(rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := Recover(context.Background(), s, left, w.plan(&proc{w: w})); err != nil {
				t.Fatalf("recover from %s: %v", left.State, err)
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			got, _ := s.Read(rec.ID)
			onSource := w.source == "running" && w.dest == "" && !w.image && !w.vmEntry && w.dnsAddr == oldIP && w.dnsTTL == 2
			atDest := w.source == "quit" && w.dest == "running" && w.image && w.vmEntry && w.dnsAddr == newIP && w.dnsTTL == 2
			if !onSource && !atDest || w.redirect != "" || w.tunnels != 0 || w.disk || got.Open() {
				t.Fatalf("after recovering from %s (%v): %+v; record %s, outcome %+v", left.State, left.Recovery, w, got.State, got.Outcome)
			}
			if wantMoved := left.Done.Committed || k.hook == false && k.phase == "memory" && k.end; wantMoved != atDest {
				t.Errorf("state %s: moved %v, want %v", left.State, atDest, wantMoved)
			}
			t.Logf("%s -> %s (%s): %v", left.State, got.State, got.Recovery.Direction, got.Recovery.Actions)
		})
	}
}
