package journal

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/proxy/ddns"
)

func ev(phase string, end bool, err string) migrator.PhaseEvent {
	return migrator.PhaseEvent{Phase: phase, End: end, Err: err, Token: 42}
}

// through plays a migration's phase events up to and including the
// n-th, as Run (and Drain) send them when everything succeeds.
var successful = []migrator.PhaseEvent{
	ev("datapath", false, ""), ev("datapath", true, ""),
	ev("dns-prepare", false, ""), ev("destination", false, ""), ev("destination", true, ""),
	{Phase: "dns-prepare", End: true, Token: 42, DNSTTLBefore: 300},
	ev("disk-bulk", false, ""), ev("disk-bulk", true, ""), ev("disk-prehash", false, ""), ev("disk-prehash", true, ""),
	ev("memory", false, ""), ev("memory", true, ""),
	{Phase: "disk-release", Token: 42, Committed: true}, {Phase: "disk-release", End: true, Token: 42, Committed: true},
	{Phase: "health", Token: 42, Committed: true}, {Phase: "health", End: true, Token: 42, Committed: true},
	{Phase: "dns-flip", Token: 42, Committed: true}, {Phase: "dns-flip", End: true, Token: 42, Committed: true, DNSCachedUntil: time.Unix(1e9, 0)},
	{Phase: "dns-restore", Token: 42, Committed: true}, {Phase: "dns-restore", End: true, Token: 42, Committed: true},
	{Phase: "source-cleanup", Token: 42, Committed: true}, {Phase: "source-cleanup", End: true, Token: 42, Committed: true},
	{Phase: "drain", Token: 42, Committed: true}, {Phase: "drain", End: true, Token: 42, Committed: true},
}

func through(t *testing.T, phase string, end bool) *Record {
	t.Helper()
	r := &Record{ID: "web1-0a0b0c0d", Name: "web1", State: StateStarted}
	for _, e := range successful {
		r.Apply(e, time.Now())
		if e.Phase == phase && e.End == end {
			return r
		}
	}
	t.Fatalf("no event %s end=%v", phase, end)
	return nil
}

// TestApplyStates: the phase events take a record through the states,
// with the facts recovery needs (token, TTL before, cache horizon).
func TestApplyStates(t *testing.T) {
	for _, c := range []struct {
		phase string
		end   bool
		want  State
	}{
		{"datapath", false, StatePreparing},
		{"datapath", true, StatePreparing},
		{"dns-prepare", false, StateCopying},
		{"destination", false, StateCopying},
		{"disk-bulk", false, StateCopying},
		{"memory", false, StateSwitching},
		{"memory", true, StateCommitted},
		{"health", true, StateCommitted},
		{"dns-flip", true, StateFlipped},
		{"source-cleanup", true, StateFlipped},
		{"drain", false, StateDraining},
		{"drain", true, StateDrained},
	} {
		if r := through(t, c.phase, c.end); r.State != c.want {
			t.Errorf("after %s end=%v: state %s, want %s", c.phase, c.end, r.State, c.want)
		}
	}
	r := through(t, "drain", true)
	if r.Token != 42 || r.DNSTTLBeforeS != 300 || !r.DNSCachedUntil.Equal(time.Unix(1e9, 0)) || len(r.Phases) != 12 {
		t.Errorf("facts: token %d, ttl %d, cached until %v, %d phases", r.Token, r.DNSTTLBeforeS, r.DNSCachedUntil, len(r.Phases))
	}
	// A failure before the commit point, then the job's outcome: rolled back.
	r = through(t, "disk-bulk", false)
	r.Apply(ev("disk-bulk", true, "boom"), time.Now())
	r.Close(Outcome{ExitCode: migrator.ExitAborted, Error: "disk-bulk: boom"})
	if r.State != StateRolledBack || r.Phases[len(r.Phases)-1].Error != "boom" {
		t.Errorf("after a failed phase and the outcome: %s, %+v", r.State, r.Phases[len(r.Phases)-1])
	}
	// A failed health check: kept.
	r = through(t, "health", false)
	r.Apply(migrator.PhaseEvent{Phase: "health", End: true, Err: "no answer", Committed: true}, time.Now())
	if r.State != StateKept {
		t.Errorf("after a failed health check: %s", r.State)
	}
}

func acts(a ...migrator.RecoveryAction) []migrator.RecoveryAction { return a }

// TestRule: the recovery of each state, as a table.
func TestRule(t *testing.T) {
	yes, no := true, false
	kept := through(t, "health", false)
	kept.Apply(migrator.PhaseEvent{Phase: "health", End: true, Err: "no answer", Committed: true}, time.Now())
	flipFailed := through(t, "dns-flip", false)
	flipFailed.Apply(migrator.PhaseEvent{Phase: "dns-flip", End: true, Err: "refused", Committed: true}, time.Now())
	flipFailed.Close(Outcome{ExitCode: migrator.ExitFollowUp})
	undone := through(t, "memory", false)
	undone.Apply(ev("memory", true, "not converging"), time.Now())
	undone.Close(Outcome{ExitCode: migrator.ExitAborted})
	noDNS := &Record{ID: "x"}
	for _, e := range []migrator.PhaseEvent{ev("datapath", false, ""), ev("datapath", true, ""), ev("destination", false, "")} {
		noDNS.Apply(e, time.Now())
	}
	for _, c := range []struct {
		name string
		rec  *Record
		f    Facts
		dir  Direction
		want []migrator.RecoveryAction
	}{
		{"started", &Record{ID: "x", State: StateStarted}, Facts{}, DirNone, nil},
		{"preparing", through(t, "datapath", false), Facts{}, DirRollBack, acts("remove-redirect", "retire-tunnels")},
		{"copying, no dns", noDNS, Facts{}, DirRollBack, acts("end-disk-stream", "abort-destination", "remove-redirect", "retire-tunnels")},
		{"copying", through(t, "disk-bulk", false), Facts{}, DirRollBack,
			acts("end-disk-stream", "abort-destination", "restore-dns-ttl", "remove-redirect", "retire-tunnels")},
		{"switching, not asked", through(t, "memory", false), Facts{}, DirUndecided, acts("probe-source")},
		{"preparing, source gone", through(t, "datapath", false), Facts{SourceGone: "gone"}, DirRollBack, acts("remove-redirect", "retire-tunnels")},
		{"copying, source gone", through(t, "disk-bulk", false), Facts{SourceGone: "gone"}, DirRollBack,
			acts("end-disk-stream", "abort-destination", "restore-dns-ttl", "remove-redirect", "retire-tunnels")},
		{"switching, source gone, destination waiting", through(t, "memory", false), Facts{SourceGone: "gone", DestStatus: "inmigrate"}, DirRollBack,
			acts("remove-redirect", "end-disk-stream", "abort-destination", "restore-dns-ttl", "retire-tunnels")},
		{"switching, source gone, destination runs it", through(t, "memory", false), Facts{SourceGone: "gone", DestStatus: "running"}, DirForward,
			acts("check-health", "flip-dns", "restore-dns-ttl", "end-disk-stream", "stop-source", "finish-drain")},
		{"switching, source gone, destination unknown", through(t, "memory", false), Facts{SourceGone: "gone", DestStatus: "unknown: unreachable"}, DirOperator, nil},
		{"switching, source gone, destination paused", through(t, "memory", false), Facts{SourceGone: "gone", DestStatus: "paused"}, DirOperator, nil},
		{"switching, not migrated", through(t, "memory", false), Facts{SourceMigrated: &no}, DirRollBack,
			acts("cancel-source-migration", "remove-redirect", "end-disk-stream", "resume-source", "abort-destination", "restore-dns-ttl", "retire-tunnels")},
		{"switching, migrated", through(t, "memory", false), Facts{SourceMigrated: &yes}, DirForward,
			acts("check-health", "flip-dns", "restore-dns-ttl", "end-disk-stream", "stop-source", "finish-drain")},
		{"committed", through(t, "memory", true), Facts{}, DirForward,
			acts("check-health", "flip-dns", "restore-dns-ttl", "end-disk-stream", "stop-source", "finish-drain")},
		{"disk released", through(t, "disk-release", true), Facts{}, DirForward,
			acts("check-health", "flip-dns", "restore-dns-ttl", "stop-source", "finish-drain")},
		{"health passed", through(t, "health", true), Facts{}, DirForward, acts("flip-dns", "restore-dns-ttl", "stop-source", "finish-drain")},
		{"kept", kept, Facts{}, DirOperator, nil},
		{"flipped", through(t, "dns-flip", true), Facts{}, DirForward, acts("restore-dns-ttl", "stop-source", "finish-drain")},
		{"source stopped", through(t, "source-cleanup", true), Facts{}, DirForward, acts("finish-drain")},
		{"draining", through(t, "drain", false), Facts{}, DirForward, acts("finish-drain")},
		{"drained", through(t, "drain", true), Facts{}, DirNone, nil},
		{"closed, undone by the job", undone, Facts{}, DirNone, nil},
		{"closed, flip failed", flipFailed, Facts{}, DirForward, acts("flip-dns", "restore-dns-ttl")},
	} {
		t.Run(c.name, func(t *testing.T) {
			rc := Rule(c.rec, c.f)
			if rc.Direction != c.dir || !slices.Equal(rc.Actions, c.want) || rc.Why == "" {
				t.Errorf("state %s: %s %v (%s), want %s %v", c.rec.State, rc.Direction, rc.Actions, rc.Why, c.dir, c.want)
			}
		})
	}
}

// TestStoreDurable: a written record reads back; a write whose fsync
// fails reports it and leaves the previous record and no temp file.
func TestStoreDurable(t *testing.T) {
	s := NewStore(filepath.Join(t.TempDir(), "journal"))
	r := through(t, "memory", false)
	r.Spec = "name: web1\n"
	if err := s.Write(r); err != nil {
		t.Fatal(err)
	}
	got, err := s.Read(r.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != StateSwitching || got.Token != 42 || got.Seq != 1 || got.Spec != r.Spec || !got.Done.Switching || len(got.Phases) != len(r.Phases) {
		t.Fatalf("read back %+v", got)
	}
	errDisk := errors.New("EIO")
	s.sync = func(*os.File) error { return errDisk }
	r.Apply(ev("memory", true, ""), time.Now())
	if err := s.Write(r); !errors.Is(err, errDisk) {
		t.Fatalf("write with a failing fsync: %v", err)
	}
	s.sync = (*os.File).Sync
	got, _ = s.Read(r.ID)
	if got.State != StateSwitching {
		t.Errorf("after a failed write the record says %s, want the previous (switching)", got.State)
	}
	ents, _ := os.ReadDir(s.Dir)
	if len(ents) != 1 {
		t.Errorf("files in the journal: %v", ents)
	}
	if _, err := s.Read("../etc/passwd"); err == nil {
		t.Error("a path as the id was read")
	}
	// List and Prune: open records stay.
	for i, id := range []string{"a-1", "b-2", "c-3"} {
		x := &Record{ID: id, Started: time.Unix(int64(100+i), 0)}
		if id != "b-2" {
			x.Close(Outcome{OK: true})
		}
		if err := s.Write(x); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Prune(1); err != nil {
		t.Fatal(err)
	}
	all, err := s.List()
	var ids []string
	for _, x := range all {
		ids = append(ids, x.ID)
	}
	if err != nil || strings.Join(ids, " ") != "web1-0a0b0c0d b-2 c-3" {
		t.Errorf("after prune: %v %v", ids, err)
	}
}

// The fakes below play the hosts, the driver and DNS of a migration a
// killed vmhopd left: each call is logged.

type calls struct {
	mu   sync.Mutex
	list []string
}

func (c *calls) add(s string) { c.mu.Lock(); c.list = append(c.list, s); c.mu.Unlock() }

type fakeSource struct{ c *calls }

func (s fakeSource) PrepareSource(context.Context, migrator.SourcePrepare) (migrator.TunnelEnd, error) {
	return migrator.TunnelEnd{}, nil
}
func (s fakeSource) SetRedirect(context.Context, migrator.RedirectSwitch) error { return nil }
func (s fakeSource) RemoveRedirect(context.Context, migrator.RedirectRemove) error {
	s.c.add("source: remove redirect")
	return nil
}
func (s fakeSource) RetireTunnel(_ context.Context, t migrator.Tunnel) error {
	s.c.add("source: retire tunnel " + strings.Repeat("*", int(t.Token%50)))
	return nil
}
func (s fakeSource) RedirectState(context.Context, migrator.RedirectQuery) (migrator.RedirectState, error) {
	return migrator.RedirectState{Idle: time.Hour, Seen: true}, nil
}
func (s fakeSource) StatImage(context.Context, migrator.ImageRef) (migrator.ImageInfo, error) {
	return migrator.ImageInfo{}, nil
}
func (s fakeSource) HashImage(context.Context, migrator.HashRequest) (migrator.Digests, error) {
	return migrator.Digests{}, nil
}
func (s fakeSource) HeldAddrs(context.Context, migrator.AddrQuery) (migrator.HeldAddrs, error) {
	return migrator.HeldAddrs{}, nil
}

type fakeDest struct{ c *calls }

func (d fakeDest) PrepareDestination(context.Context, migrator.DestPrepare) (migrator.TunnelEnd, error) {
	return migrator.TunnelEnd{}, nil
}
func (d fakeDest) CreateImage(context.Context, migrator.ImageCreate) error { return nil }
func (d fakeDest) AttachVM(_ context.Context, req migrator.VMAttach) error {
	d.c.add("dest: attach vm (tunnel " + map[bool]string{true: "on", false: "off"}[req.Tunnel.Peer.IsValid()] + ")")
	return nil
}
func (d fakeDest) HashImage(context.Context, migrator.HashRequest) (migrator.Digests, error) {
	return migrator.Digests{}, nil
}
func (d fakeDest) RetireTunnel(context.Context, migrator.Tunnel) error {
	d.c.add("dest: retire tunnel")
	return nil
}
func (d fakeDest) Abort(context.Context, migrator.DestAbort) error {
	d.c.add("dest: abort")
	return nil
}
func (d fakeDest) HeldAddrs(context.Context, migrator.AddrQuery) (migrator.HeldAddrs, error) {
	return migrator.HeldAddrs{}, nil
}

type fakeDriver struct {
	c        *calls
	migrated bool
	gone     bool   // the source VM's process exited
	dest     string // the destination's run state; "" cannot say
}

func (d *fakeDriver) SourceGone(context.Context) (bool, string) {
	if d.gone {
		return true, "its QMP socket /run/web1.qmp refuses connections and no process names it"
	}
	return false, "its QMP socket /run/web1.qmp accepts connections"
}
func (d *fakeDriver) DestinationStatus(context.Context) (string, error) {
	d.c.add("driver: destination status")
	if d.dest == "" {
		return "", errors.New("no incoming migration web1-x on this host")
	}
	return d.dest, nil
}

func (d *fakeDriver) PrepareDestination(context.Context) error { return nil }
func (d *fakeDriver) Migrate(context.Context, hypervisor.Options, chan<- hypervisor.Progress, hypervisor.Switchover) (hypervisor.Result, error) {
	return hypervisor.Result{}, errors.New("not here")
}
func (d *fakeDriver) ResumeSource(context.Context) error {
	d.c.add("driver: resume source")
	return nil
}
func (d *fakeDriver) AbortDestination(context.Context) error {
	d.c.add("driver: abort destination")
	return nil
}
func (d *fakeDriver) StopSource(context.Context) error    { d.c.add("driver: stop source"); return nil }
func (d *fakeDriver) ConnectSource(context.Context) error { return nil }
func (d *fakeDriver) SourceMigrated(context.Context) (bool, error) {
	d.c.add("driver: probe")
	return d.migrated, nil
}
func (d *fakeDriver) CancelMigration(context.Context) error {
	d.c.add("driver: cancel migration")
	return nil
}

type fakeDNS struct{ c *calls }

func (d fakeDNS) Show(context.Context, string, string) (ddns.State, error) { return ddns.State{}, nil }
func (d fakeDNS) Prepare(context.Context, string, string, uint32) (ddns.Result, error) {
	return ddns.Result{}, nil
}
func (d fakeDNS) Flip(context.Context, string, string, []netip.Addr, []netip.Addr, uint32) (ddns.Result, error) {
	d.c.add("dns: flip")
	return ddns.Result{}, nil
}
func (d fakeDNS) Restore(_ context.Context, _, _ string, ttl uint32) (ddns.Result, error) {
	d.c.add("dns: restore ttl " + map[uint32]string{300: "300"}[ttl])
	return ddns.Result{}, nil
}

func fakePlan(c *calls, migrated bool) *migrator.Plan {
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	return &migrator.Plan{VM: "web1", Source: fakeSource{c}, Dest: fakeDest{c}, Driver: &fakeDriver{c: c, migrated: migrated},
		DNS: fakeDNS{c}, Zone: "example.", DNSName: "svc.example.", TTL: 5,
		SourceWAN: netip.MustParseAddr("192.0.2.1"), DestWAN: netip.MustParseAddr("192.0.2.2"),
		OldIP: netip.MustParseAddr("10.1.0.10"), NewIP: netip.MustParseAddr("10.2.0.10"), VMMAC: mac,
		DestDisk: "/var/lib/vmhop/web1.raw", DrainIdle: time.Millisecond, DrainTimeout: time.Second}
}

// TestRecoverSwitching: a vmhopd killed inside the memory stream is
// recovered by asking the source: not migrated -> rolled back (the
// source runs, the destination and the redirect are gone, DNS's TTL
// back); migrated -> taken forward (DNS flipped, the source stopped, the
// drain finished). Either way the record is closed with the exit code the
// migration deserves, and a second recovery does nothing.
func TestRecoverSwitching(t *testing.T) {
	for _, c := range []struct {
		migrated bool
		want     []string
		state    State
		exit     int
	}{
		{false, []string{"driver: probe", "driver: cancel migration", "source: remove redirect", "driver: resume source",
			"driver: abort destination", "dest: abort", "dns: restore ttl 300", "source: retire tunnel " + strings.Repeat("*", 42), "dest: retire tunnel"},
			StateRolledBack, migrator.ExitAborted},
		{true, []string{"driver: probe", "dns: flip", "dns: restore ttl 300", "driver: stop source",
			"source: remove redirect", "dest: attach vm (tunnel off)", "source: retire tunnel " + strings.Repeat("*", 42), "dest: retire tunnel"},
			StateDrained, migrator.ExitMoved},
	} {
		t.Run(map[bool]string{true: "migrated", false: "not migrated"}[c.migrated], func(t *testing.T) {
			s := NewStore(t.TempDir())
			rec := through(t, "memory", false)
			rec.Started = time.Now().Add(-time.Minute)
			if err := s.Write(rec); err != nil {
				t.Fatal(err)
			}
			cl := &calls{}
			rc, err := Recover(context.Background(), s, rec, fakePlan(cl, c.migrated))
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(cl.list, "\n") != strings.Join(c.want, "\n") {
				t.Fatalf("calls:\n  %s\nwant\n  %s", strings.Join(cl.list, "\n  "), strings.Join(c.want, "\n  "))
			}
			got, err := s.Read(rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			if got.Open() || got.State != c.state || got.Outcome.ExitCode != c.exit || !got.Outcome.Recovered ||
				got.Recovery == nil || got.Recovery.Applied.IsZero() || *got.Recovery.Facts.SourceMigrated != c.migrated {
				t.Fatalf("record after recovery: state %s, outcome %+v, recovery %+v (rule said %s)", got.State, got.Outcome, got.Recovery, rc.Direction)
			}
			cl.list = nil
			if rc, err := Recover(context.Background(), s, got, fakePlan(cl, c.migrated)); err != nil || rc.Direction != DirNone || len(cl.list) != 0 {
				t.Errorf("second recovery: %s %v, calls %v", rc.Direction, err, cl.list)
			}
		})
	}
}

// TestRecoverSourceGone: a record before the commit point whose source VM
// is gone (its QEMU exited) is rolled back without the source (nothing
// cancelled or resumed there) and closed failed, the error naming the VM,
// that it is not running, its untouched disk image and that it must be
// started again; a second recovery does nothing. Inside the memory stream
// the destination is asked: waiting for the stream -> the same roll back;
// running the VM -> forward (committed); no answer -> operator, nothing
// done at the destination, the record left open without an error (no
// retry).
func TestRecoverSourceGone(t *testing.T) {
	retire := "source: retire tunnel " + strings.Repeat("*", 42)
	for _, c := range []struct {
		name  string
		phase string
		dest  string
		want  []string
		dir   Direction
		state State // "": left open
		exit  int
	}{
		{"preparing", "datapath", "", []string{"source: remove redirect", retire, "dest: retire tunnel"}, DirRollBack, StateRolledBack, migrator.ExitAborted},
		{"copying", "disk-bulk", "", []string{"driver: abort destination", "dest: abort", "dns: restore ttl 300",
			"source: remove redirect", retire, "dest: retire tunnel"}, DirRollBack, StateRolledBack, migrator.ExitAborted},
		{"switching, destination waiting", "memory", "inmigrate", []string{"driver: destination status", "source: remove redirect",
			"driver: abort destination", "dest: abort", "dns: restore ttl 300", retire, "dest: retire tunnel"}, DirRollBack, StateRolledBack, migrator.ExitAborted},
		{"switching, destination runs it", "memory", "running", []string{"driver: destination status", "dns: flip", "dns: restore ttl 300",
			"source: remove redirect", "dest: attach vm (tunnel off)", retire, "dest: retire tunnel"}, DirForward, StateDrained, migrator.ExitMoved},
		{"switching, destination cannot say", "memory", "", []string{"driver: destination status"}, DirOperator, "", 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := NewStore(t.TempDir())
			rec := through(t, c.phase, false)
			rec.VM = "qemu:/run/web1.qmp"
			if err := s.Write(rec); err != nil {
				t.Fatal(err)
			}
			cl := &calls{}
			plan := func() *migrator.Plan {
				p := fakePlan(cl, false)
				p.Driver = &fakeDriver{c: cl, gone: true, dest: c.dest}
				p.SourceDisk, p.Label = "/var/lib/vm/web1.qcow2", "site-b"
				return p
			}
			rc, err := Recover(context.Background(), s, rec, plan())
			if err != nil {
				t.Fatal(err)
			}
			if rc.Direction != c.dir || rc.Facts.SourceGone == "" || strings.Join(cl.list, "\n") != strings.Join(c.want, "\n") {
				t.Fatalf("%s (%s), calls:\n  %s\nwant %s\n  %s", rc.Direction, rc.Why, strings.Join(cl.list, "\n  "), c.dir, strings.Join(c.want, "\n  "))
			}
			got, err := s.Read(rec.ID)
			if err != nil {
				t.Fatal(err)
			}
			if c.state == "" {
				if !got.Open() || got.Recovery == nil || got.Recovery.Direction != DirOperator || !strings.Contains(got.Recovery.Why, "not running") {
					t.Fatalf("record: state %s, outcome %+v, recovery %+v", got.State, got.Outcome, got.Recovery)
				}
				return
			}
			if got.Open() || got.State != c.state || got.Outcome.ExitCode != c.exit || !got.Outcome.Recovered {
				t.Fatalf("record: state %s, outcome %+v", got.State, got.Outcome)
			}
			if c.dir == DirRollBack {
				for _, w := range []string{"qemu:/run/web1.qmp is not running", "refuses connections", "site-b", "old address",
					"/var/lib/vm/web1.qcow2 on the source is untouched", "Start the VM again"} {
					if !strings.Contains(got.Outcome.Error, w) {
						t.Errorf("outcome error %q does not say %q", got.Outcome.Error, w)
					}
				}
			}
			cl.list = nil
			if rc, err := Recover(context.Background(), s, got, plan()); err != nil || rc.Direction != DirNone || len(cl.list) != 0 {
				t.Errorf("second recovery: %s %v, calls %v", rc.Direction, err, cl.list)
			}
		})
	}
}
