package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
)

// phasedMigrator goes through phases with job.OnPhase as migrator.Run
// would, then waits at the phase named hold until released or cancelled.
type phasedMigrator struct {
	phases  []string
	hold    string
	reached chan struct{}
	release chan struct{}
}

func (f *phasedMigrator) Migrate(ctx context.Context, job *Job) (any, error) {
	for _, ph := range f.phases {
		if err := job.OnPhase(ctx, migrator.PhaseEvent{Phase: ph, Token: 7}); err != nil {
			return nil, err
		}
		if ph == f.hold {
			close(f.reached)
			select {
			case <-f.release:
			case <-ctx.Done():
				job.OnPhase(ctx, migrator.PhaseEvent{Phase: ph, End: true, Err: ctx.Err().Error()})
				return nil, fmt.Errorf("%s: %w", ph, ctx.Err())
			}
		}
		if err := job.OnPhase(ctx, migrator.PhaseEvent{Phase: ph, End: true, Token: 7, Committed: ph == "memory"}); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// TestJournalAbortHistory: a running migration's journal is on disk with
// its state; abort cancels it (it ends failed, exit 1: aborted); the
// history lists it from the journal, also after vmhopd restarts.
func TestJournalAbortHistory(t *testing.T) {
	cfg := localOnly(t)
	fm := &phasedMigrator{phases: []string{"datapath", "destination", "disk-bulk"}, hold: "disk-bulk",
		reached: make(chan struct{}), release: make(chan struct{})}
	d := start(t, cfg, Options{Migrator: fm}, nil)
	lc := NewLocalClient(cfg.Socket)
	ctx := context.Background()
	id, err := lc.Migrate(ctx, readSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	<-fm.reached
	var rec journal.Record
	b, err := os.ReadFile(filepath.Join(cfg.StateDir, "journal", id+".json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.State != journal.StateCopying || rec.Token != 7 || !rec.Done.Destination || !rec.Open() || !strings.Contains(rec.Spec, "name: web1") {
		t.Fatalf("journal while copying: %s", b)
	}
	st, err := lc.Migration(ctx, id)
	if err != nil || st.Phase != "disk-bulk" || st.Journal != "copying" || st.State != "running" {
		t.Fatalf("status of %s: %+v %v", id, st, err)
	}
	// While it runs it is not for recovery.
	if p, err := lc.RecoveryPlan(ctx); err != nil || len(p) != 0 {
		t.Fatalf("recovery plan while running: %+v %v", p, err)
	}
	if st, err := lc.Abort(ctx, id); err != nil || !st.AbortRequested {
		t.Fatalf("abort: %+v %v", st, err)
	}
	_, res, err := follow(t, lc, id)
	if err != nil || res.OK || res.ExitCode != migrator.ExitAborted || !strings.HasPrefix(res.Error, "aborted by vmhop abort") {
		t.Fatalf("result after abort: %+v %v", res, err)
	}
	if _, err := lc.Abort(ctx, id); CodeOf(err) != CodeFailedPrecondition {
		t.Fatalf("abort of an ended migration: %v", err)
	}
	if _, err := lc.Abort(ctx, "nosuch-1"); CodeOf(err) != CodeNotFound {
		t.Fatalf("abort of an unknown migration: %v", err)
	}
	h, err := lc.History(ctx)
	if err != nil || len(h) != 1 || h[0].ID != id || h[0].OK || h[0].ExitCode != migrator.ExitAborted ||
		h[0].State != journal.StateRolledBack || h[0].Phases != 3 {
		t.Fatalf("history: %+v %v", h, err)
	}
	_ = d
	// A new vmhopd on the same state_dir lists it too.
	cfg2 := cfg
	cfg2.Socket = filepath.Join(t.TempDir(), "vmhopd2.sock")
	start(t, cfg2, Options{}, nil)
	h2, err := NewLocalClient(cfg2.Socket).History(ctx)
	if err != nil || len(h2) != 1 || h2[0].ID != id {
		t.Fatalf("history after a restart: %+v %v", h2, err)
	}
}

// TestAbortRefusedPastCommit: once the journal says committed, abort is
// refused: the VM runs at the destination.
func TestAbortRefusedPastCommit(t *testing.T) {
	cfg := localOnly(t)
	fm := &phasedMigrator{phases: []string{"datapath", "memory", "dns-flip"}, hold: "dns-flip",
		reached: make(chan struct{}), release: make(chan struct{})}
	start(t, cfg, Options{Migrator: fm}, nil)
	lc := NewLocalClient(cfg.Socket)
	id, err := lc.Migrate(context.Background(), readSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	<-fm.reached
	if _, err := lc.Abort(context.Background(), id); CodeOf(err) != CodeFailedPrecondition || !strings.Contains(err.Error(), "commit point") {
		t.Fatalf("abort past the commit point: %v", err)
	}
	close(fm.release)
	if _, res, err := follow(t, lc, id); err != nil || !res.OK {
		t.Fatalf("result: %+v %v", res, err)
	}
}

// planner is a Migrator whose RecoveryPlan fails.
type planner struct{ fakeMigrator }

func (p *planner) RecoveryPlan(context.Context, *journal.Record) (*migrator.Plan, func(), error) {
	return nil, nil, errors.New("spec names an unknown peer")
}

// TestRecoverLeftRecords: records a killed vmhopd left are listed with
// the rule's plan; Recover without a RecoveryPlanner applies nothing and
// says so; with a planner that fails, the record stays open and the
// error is reported.
func TestRecoverLeftRecords(t *testing.T) {
	cfg := localOnly(t)
	s := journal.NewStore(filepath.Join(cfg.StateDir, "journal"))
	left := &journal.Record{ID: "web1-deadbeef", Name: "web1", VM: "qemu:/run/web1.qmp", Started: time.Now().Add(-time.Hour)}
	for _, e := range []migrator.PhaseEvent{{Phase: "datapath", Token: 9}, {Phase: "datapath", End: true}, {Phase: "destination"},
		{Phase: "destination", End: true}, {Phase: "memory"}} {
		left.Apply(e, time.Now())
	}
	done := &journal.Record{ID: "web0-00000001", Name: "web0", Started: time.Now().Add(-2 * time.Hour)}
	done.Close(journal.Outcome{OK: true})
	for _, r := range []*journal.Record{left, done} {
		if err := s.Write(r); err != nil {
			t.Fatal(err)
		}
	}
	d := start(t, cfg, Options{Migrator: &fakeMigrator{}}, nil)
	lc := NewLocalClient(cfg.Socket)
	p, err := lc.RecoveryPlan(context.Background())
	if err != nil || len(p) != 1 || p[0].ID != left.ID || p[0].State != journal.StateSwitching ||
		p[0].Recovery.Direction != journal.DirUndecided || len(p[0].Recovery.Actions) != 1 || p[0].Recovery.Actions[0] != migrator.ActProbeSource {
		t.Fatalf("recovery plan: %+v %v", p, err)
	}
	out, err := d.Recover(context.Background())
	if !errors.Is(err, ErrNoRecoverer) || len(out) != 1 || out[0].Error == "" {
		t.Fatalf("recover without a planner: %+v %v", out, err)
	}
	d2 := &Daemon{opts: Options{Migrator: &planner{}}, journal: s, log: d.log}
	out, err = d2.Recover(context.Background())
	if err == nil || len(out) != 1 || !strings.Contains(out[0].Error, "unknown peer") {
		t.Fatalf("recover with a failing planner: %+v %v", out, err)
	}
	if r, _ := s.Read(left.ID); !r.Open() {
		t.Fatalf("record closed without recovery: %+v", r)
	}
	// Over the API: the entries carry the error.
	out, err = lc.Recover(context.Background())
	if err != nil || len(out) != 1 || !strings.Contains(out[0].Error, "RecoveryPlanner") {
		t.Fatalf("recover verb: %+v %v", out, err)
	}
	// The VM may not move again while its last migration is unfinished.
	spec := strings.Replace(string(readSpec(t)), "/run/vmhop/web1.qmp", "/run/web1.qmp", 1)
	if _, err := lc.Migrate(context.Background(), []byte(spec)); CodeOf(err) != CodeFailedPrecondition || !strings.Contains(err.Error(), left.ID) {
		t.Fatalf("migrate a VM with an unfinished journal record: %v", err)
	}
	if _, err := lc.Migrate(context.Background(), readSpec(t)); err != nil {
		t.Fatalf("migrate another VM: %v", err)
	}
}

// preflighter is a Migrator with a preflight that refuses web1's VM
// when told to.
type preflighter struct {
	fakeMigrator
	refuse error
}

func (p *preflighter) Preflight(_ context.Context, job *Job) (any, error) {
	return map[string]any{"vm": job.Spec.VM.Name, "dns_wait_ms": 300000}, p.refuse
}

// TestPreflightVerb: the preflight answers ok or why not, with the
// Preflighter's report, and writes no journal; a Migrator without a
// preflight is unavailable for it.
func TestPreflightVerb(t *testing.T) {
	cfg := localOnly(t)
	pf := &preflighter{}
	start(t, cfg, Options{Migrator: pf}, nil)
	lc := NewLocalClient(cfg.Socket)
	r, err := lc.Preflight(context.Background(), readSpec(t))
	if err != nil || !r.OK || string(r.Report) != `{"dns_wait_ms":300000,"vm":"web1"}` {
		t.Fatalf("preflight: %+v (report %s) %v", r, r.Report, err)
	}
	pf.refuse = errors.New("preflight: new_ip 10.2.0.10 is an address of host B itself")
	r, err = lc.Preflight(context.Background(), readSpec(t))
	if err != nil || r.OK || !strings.Contains(r.Error, "host B itself") {
		t.Fatalf("refusing preflight: %+v %v", r, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(cfg.StateDir, "journal")); len(ents) != 0 {
		t.Errorf("preflight wrote the journal: %v", ents)
	}
	if _, err := lc.Preflight(context.Background(), []byte("nonsense: [")); CodeOf(err) != CodeInvalidArgument {
		t.Errorf("bad spec: %v", err)
	}
	cfg2 := localOnly(t)
	start(t, cfg2, Options{Migrator: &fakeMigrator{}}, nil)
	if _, err := NewLocalClient(cfg2.Socket).Preflight(context.Background(), readSpec(t)); CodeOf(err) != CodeUnavailable {
		t.Errorf("preflight without a Preflighter: %v", err)
	}
}

// attaching is a Migrator that attaches a plan and feeds its progress
// hooks as Run would.
type attaching struct{}

func (attaching) Migrate(ctx context.Context, job *Job) (any, error) {
	p := &migrator.Plan{}
	stop := job.Attach(p)
	defer stop()
	p.OnPhase(ctx, migrator.PhaseEvent{Phase: "disk-bulk"})
	p.DiskProgress(storage.BulkProgress{Round: 2, Done: 1 << 20, Total: 4 << 20, Sent: 3 << 20, Rate: 8e6, ETA: 3 * time.Second})
	p.Progress <- hypervisor.Progress{Status: "active", Transferred: 5 << 20, Remaining: 1 << 20, Total: 64 << 20, Iteration: 3, Throughput: 8e6}
	time.Sleep(100 * time.Millisecond)
	return nil, nil
}

// TestAttachProgress: Job.Attach turns the plan's phase and progress
// hooks into events with ProgressData (snake_case, units in the names).
func TestAttachProgress(t *testing.T) {
	cfg := localOnly(t)
	start(t, cfg, Options{Migrator: attaching{}}, nil)
	lc := NewLocalClient(cfg.Socket)
	id, err := lc.Migrate(context.Background(), readSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	var data []ProgressData
	var raw []string
	if _, err := lc.Follow(context.Background(), id, func(ev Event) error {
		if len(ev.Data) > 0 {
			var d ProgressData
			if err := json.Unmarshal(ev.Data, &d); err != nil {
				return err
			}
			data, raw = append(data, d), append(raw, string(ev.Data))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(data) != 2 || data[0].Kind != "disk" || data[0].Round != 2 || data[0].ETAMS != 3000 || data[0].SentBytes != 3<<20 ||
		data[1].Kind != "memory" || data[1].Pass != 3 || data[1].ETAMS != 1048.576 {
		t.Fatalf("progress data: %+v", data)
	}
	if want := `{"kind":"disk","done_bytes":1048576,"total_bytes":4194304,"rate_bits_per_s":8000000,"eta_ms":3000,"round":2,"sent_bytes":3145728}`; raw[0] != want {
		t.Errorf("disk data\n  %s\nwant\n  %s", raw[0], want)
	}
}

// TestFailedUndoLeavesTheRecordOpen: a migration whose undo failed (a
// host unreachable) stays open in the journal, for recovery, and the VM
// may not move again until it is recovered.
func TestFailedUndoLeavesTheRecordOpen(t *testing.T) {
	cfg := localOnly(t)
	m := MigratorFunc(func(ctx context.Context, job *Job) (any, error) {
		job.OnPhase(ctx, migrator.PhaseEvent{Phase: "datapath", Token: 3})
		job.OnPhase(ctx, migrator.PhaseEvent{Phase: "datapath", End: true, Token: 3})
		job.OnPhase(ctx, migrator.PhaseEvent{Phase: "destination"})
		job.OnPhase(ctx, migrator.PhaseEvent{Phase: "destination", End: true, Err: "site-b: unreachable"})
		return nil, errors.Join(errors.New("destination: site-b: unreachable"), fmt.Errorf("%w: dest.abort: site-b: unreachable", migrator.ErrUndo))
	})
	start(t, cfg, Options{Migrator: m}, nil)
	lc := NewLocalClient(cfg.Socket)
	id, err := lc.Migrate(context.Background(), readSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, res, err := follow(t, lc, id); err != nil || res.ExitCode != migrator.ExitAborted {
		t.Fatalf("result: %+v %v", res, err)
	}
	p, err := lc.RecoveryPlan(context.Background())
	if err != nil || len(p) != 1 || p[0].ID != id || p[0].Recovery.Direction != journal.DirRollBack {
		t.Fatalf("recovery plan: %+v %v", p, err)
	}
	if h, _ := lc.History(context.Background()); len(h) != 0 {
		t.Errorf("an unfinished migration in the history: %+v", h)
	}
	if _, err := lc.Migrate(context.Background(), readSpec(t)); CodeOf(err) != CodeFailedPrecondition {
		t.Fatalf("migrate again: %v", err)
	}
}

// flakyPlanner fails to rebuild plans until its failures are used up,
// then rebuilds an empty one (enough for a record whose recovery is
// flip-dns and restore-dns-ttl without DNS: nothing to do).
type flakyPlanner struct {
	fakeMigrator
	failures atomic.Int32
	calls    atomic.Int32
}

func (p *flakyPlanner) RecoveryPlan(context.Context, *journal.Record) (*migrator.Plan, func(), error) {
	p.calls.Add(1)
	if p.failures.Add(-1) >= 0 {
		return nil, nil, errors.New("peer site-b: connection refused")
	}
	return &migrator.Plan{}, nil, nil
}

// TestRecoveryRetried: a Recover that fails (here: the plan cannot be
// rebuilt, as when the destination is down) is tried again in the
// background until it succeeds, without an operator.
func TestRecoveryRetried(t *testing.T) {
	cfg := localOnly(t)
	s := journal.NewStore(filepath.Join(cfg.StateDir, "journal"))
	r := &journal.Record{ID: "web1-0badf11b", Name: "web1", VM: "qemu:/run/web1.qmp", Started: time.Now()}
	for _, e := range []migrator.PhaseEvent{{Phase: "dns-prepare"}, {Phase: "memory"}, {Phase: "memory", End: true},
		{Phase: "dns-flip", Committed: true}, {Phase: "dns-flip", End: true, Err: "refused", Committed: true}} {
		r.Apply(e, time.Now())
	}
	r.Close(journal.Outcome{ExitCode: migrator.ExitFollowUp})
	if err := s.Write(r); err != nil {
		t.Fatal(err)
	}
	p := &flakyPlanner{}
	p.failures.Store(2)
	d := start(t, cfg, Options{Migrator: p, RecoveryRetry: 20 * time.Millisecond}, nil)
	if _, err := d.Recover(context.Background()); err == nil {
		t.Fatal("the first recovery succeeded; want it to fail")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		left, err := d.RecoveryPlan()
		if err == nil && len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not recovered in the background after %d tries: %+v %v", p.calls.Load(), left, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got, _ := s.Read(r.ID); got.Outcome == nil || !got.Outcome.Recovered || p.calls.Load() != 3 {
		t.Errorf("record %+v after %d plans, want recovered after 3", got.Outcome, p.calls.Load())
	}
}

// goneSource and goneDest play what a roll back without the source VM
// touches: the redirect and the tunnels (any other call panics: it must
// not happen).
type goneSource struct {
	migrator.SourceHost
	calls *[]string
}

func (h goneSource) RemoveRedirect(context.Context, migrator.RedirectRemove) error {
	*h.calls = append(*h.calls, "remove redirect")
	return nil
}
func (h goneSource) RetireTunnel(context.Context, migrator.Tunnel) error {
	*h.calls = append(*h.calls, "retire tunnel")
	return nil
}

type goneDest struct {
	migrator.Destination
	calls *[]string
}

func (h goneDest) RetireTunnel(context.Context, migrator.Tunnel) error {
	*h.calls = append(*h.calls, "retire tunnel at the destination")
	return nil
}

// goneDriver is a source hypervisor whose VM exited (hypervisor.Liveness).
type goneDriver struct{ hypervisor.Driver }

func (goneDriver) SourceGone(context.Context) (bool, string) {
	return true, "its QMP socket /run/web1.qmp is missing and no process names it"
}
func (goneDriver) DestinationStatus(context.Context) (string, error) {
	return "", errors.New("not asked")
}

// gonePlanner rebuilds plans whose source VM is gone.
type gonePlanner struct {
	fakeMigrator
	calls atomic.Int32
	acts  []string
}

func (p *gonePlanner) RecoveryPlan(context.Context, *journal.Record) (*migrator.Plan, func(), error) {
	p.calls.Add(1)
	return &migrator.Plan{Source: goneSource{calls: &p.acts}, Dest: goneDest{calls: &p.acts}, Driver: goneDriver{}, SourceDisk: "/var/lib/vmhop/web1.raw"}, nil, nil
}

// TestRecoverSourceGone: a record left before the commit point whose
// source VM is gone is rolled back without it and closed failed (the
// error says the VM is not running and must be started again): the
// recovery succeeds, so it is not retried, and the VM may be migrated
// again.
func TestRecoverSourceGone(t *testing.T) {
	cfg := localOnly(t)
	s := journal.NewStore(filepath.Join(cfg.StateDir, "journal"))
	r := &journal.Record{ID: "web1-0000901e", Name: "web1", VM: "qemu:/run/vmhop/web1.qmp", Started: time.Now()}
	r.Apply(migrator.PhaseEvent{Phase: "datapath", Token: 5}, time.Now())
	if err := s.Write(r); err != nil {
		t.Fatal(err)
	}
	p := &gonePlanner{}
	d := start(t, cfg, Options{Migrator: p, RecoveryRetry: 10 * time.Millisecond}, nil)
	out, err := d.Recover(context.Background())
	if err != nil || len(out) != 1 || out[0].Error != "" || out[0].Recovery.Direction != journal.DirRollBack || out[0].Recovery.Facts.SourceGone == "" {
		t.Fatalf("recover: %+v %v", out, err)
	}
	got, _ := s.Read(r.ID)
	if got.Open() || got.State != journal.StateRolledBack || got.Outcome.OK || got.Outcome.ExitCode != migrator.ExitAborted ||
		!strings.Contains(got.Outcome.Error, "is not running") || !strings.Contains(got.Outcome.Error, "/var/lib/vmhop/web1.raw") ||
		!strings.Contains(got.Outcome.Error, "Start the VM again") {
		t.Fatalf("record: state %s, outcome %+v", got.State, got.Outcome)
	}
	if strings.Join(p.acts, ", ") != "remove redirect, retire tunnel, retire tunnel at the destination" {
		t.Errorf("actions: %v", p.acts)
	}
	time.Sleep(100 * time.Millisecond) // ten retry periods
	if n := p.calls.Load(); n != 1 {
		t.Errorf("the plan was rebuilt %d times; want once (no retry)", n)
	}
	lc := NewLocalClient(cfg.Socket)
	if _, err := lc.Migrate(context.Background(), readSpec(t)); err != nil {
		t.Fatalf("migrate the VM again: %v", err)
	}
}
