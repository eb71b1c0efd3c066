package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
)

// Job control: the journal of each migration this host coordinates
// (state_dir/journal, package journal), the hooks a Migrator attaches to
// its migrator.Plan (Job.Attach), and what the local API's status, abort,
// history, recover and preflight verbs need from a Migrator.

// Preflighter is a Migrator that can run a migration's preflight alone,
// changing nothing (the local API's preflight verb, `vmhop migrate
// --dry-run`): peers reachable and authenticated, hypervisor and image
// paths, free space, datapath or fallback, DNS key, addresses
// (migrator.Check). report is anything that encodes as JSON; err says
// why the migration would be refused. job.Emit may publish progress (no
// one follows it: the verb answers once Preflight returns).
type Preflighter interface {
	Preflight(ctx context.Context, job *Job) (report any, err error)
}

// RecoveryPlanner is a Migrator that rebuilds a migration's plan from its
// journal record (rec.Spec is the spec's YAML, rec.ID its ID), for the
// recovery of migrations a killed vmhopd left (Daemon.Recover). The plan
// needs the hosts, the driver (a hypervisor.Recoverable one, so the source
// can be asked whether its migration completed) and DNS; its disk
// strategy is not used.
type RecoveryPlanner interface {
	// RecoveryPlan's cleanup removes what building the plan made; it is
	// called once the recovery ended (never nil when err is nil).
	RecoveryPlan(ctx context.Context, rec *journal.Record) (plan *migrator.Plan, cleanup func(), err error)
}

// journalKeep is how many closed records the journal keeps (history).
const journalKeep = 200

func journalDir(stateDir string) string { return filepath.Join(stateDir, "journal") }

// Journal is the job's record, as last written (a copy; nil without one).
func (j *Job) Journal() *journal.Record {
	if j.m == nil || j.m.jr == nil {
		return nil
	}
	j.m.jmu.Lock()
	defer j.m.jmu.Unlock()
	c := *j.m.jr
	c.Phases = slices.Clone(c.Phases)
	return &c
}

// OnPhase is a migrator.Plan.OnPhase for this job: it writes the phase's
// start or end to the journal durably (before the phase acts: an error
// keeps it from acting) and publishes it as an Event.
func (j *Job) OnPhase(_ context.Context, ev migrator.PhaseEvent) error {
	if j.m == nil {
		return nil
	}
	if j.m.jr != nil {
		j.m.jmu.Lock()
		j.m.jr.Apply(ev, time.Now().UTC())
		err := j.Daemon.journal.Write(j.m.jr)
		j.m.jmu.Unlock()
		if err != nil {
			return err
		}
	}
	msg := "started"
	switch {
	case ev.End && ev.Err != "":
		msg = "failed: " + ev.Err
	case ev.End:
		msg = fmt.Sprintf("done in %s", ev.Duration.Round(time.Millisecond))
	}
	j.m.setPhase(ev.Phase)
	j.Emit(Event{Phase: ev.Phase, Message: msg})
	return nil
}

// Attach connects plan to the job: its phases go to the journal and the
// progress stream (OnPhase), its memory and disk progress to the stream
// as ProgressData, at most every progressEvery per kind. Call it once
// before migrator.Run; the returned stop ends the progress forwarding
// (call it after Run and Drain returned).
func (j *Job) Attach(plan *migrator.Plan) (stop func()) {
	plan.OnPhase = j.OnPhase
	if j.m != nil && j.m.jr != nil {
		j.m.jmu.Lock()
		if len(plan.VMMAC) > 0 {
			j.m.jr.VMMAC = plan.VMMAC.String()
		}
		if len(plan.GatewayMAC) > 0 {
			j.m.jr.GatewayMAC = plan.GatewayMAC.String()
		}
		if err := j.Daemon.journal.Write(j.m.jr); err != nil {
			j.Daemon.log.Warn("journal: the plan's MACs were not written", "id", j.ID, "err", err)
		}
		j.m.jmu.Unlock()
	}
	ch := make(chan hypervisor.Progress, 16)
	plan.Progress = ch
	var diskMu sync.Mutex
	var diskAt time.Time
	plan.DiskProgress = func(p storage.BulkProgress) {
		diskMu.Lock()
		due := time.Since(diskAt) >= progressEvery || p.Done >= p.Total
		if due {
			diskAt = time.Now()
		}
		diskMu.Unlock()
		if due {
			j.emitProgress("disk-bulk", DiskProgressData(p))
		}
	}
	done := make(chan struct{})
	var once sync.Once
	go func() {
		var at time.Time
		for {
			select {
			case <-done:
				return
			case p := <-ch:
				if time.Since(at) >= progressEvery {
					at = time.Now()
					j.emitProgress("memory", MemoryProgressData(p))
				}
			}
		}
	}()
	return func() { once.Do(func() { close(done) }) }
}

// progressEvery bounds how often progress events are published per kind.
var progressEvery = 500 * time.Millisecond

func (j *Job) emitProgress(phase string, d ProgressData) {
	b, err := json.Marshal(d)
	if err != nil {
		return
	}
	if j.m != nil {
		j.m.setProgress(d)
	}
	j.Emit(Event{Phase: phase, Data: b})
}

// ProgressData is a progress event's Data: the disk's bulk copy (kind
// "disk") or the memory stream (kind "memory"). Units are in the names.
type ProgressData struct {
	Kind       string `json:"kind"`        // "disk" or "memory"
	DoneBytes  uint64 `json:"done_bytes"`  // disk: copied; memory: sent
	TotalBytes uint64 `json:"total_bytes"` // disk: the image; memory: guest RAM
	// RateBitsPerS is the stream's throughput.
	RateBitsPerS float64 `json:"rate_bits_per_s"`
	// ETAMS is the time to the end of the current pass or round, in ms
	// (0: unknown).
	ETAMS float64 `json:"eta_ms"`
	// Disk only: the chunked engine's round (0: a mirror) and bytes on the wire.
	Round     int   `json:"round,omitempty"`
	SentBytes int64 `json:"sent_bytes,omitempty"`
	// Memory only: the pass over memory, what is left of it, the guest's
	// dirty rate, the hypervisor's state and its expected final pause.
	Pass               uint64  `json:"pass,omitempty"`
	RemainingBytes     uint64  `json:"remaining_bytes,omitempty"`
	DirtyBytesPerS     uint64  `json:"dirty_bytes_per_s,omitempty"`
	Status             string  `json:"status,omitempty"`
	ExpectedDowntimeMS float64 `json:"expected_downtime_ms,omitempty"`
}

// DiskProgressData is p as a progress event's data.
func DiskProgressData(p storage.BulkProgress) ProgressData {
	return ProgressData{Kind: "disk", DoneBytes: p.Done, TotalBytes: p.Total, RateBitsPerS: p.Rate,
		ETAMS: float64(p.ETA.Milliseconds()), Round: p.Round, SentBytes: p.Sent}
}

// MemoryProgressData is p as a progress event's data; the ETA is what is
// left of the pass at the current throughput.
func MemoryProgressData(p hypervisor.Progress) ProgressData {
	d := ProgressData{Kind: "memory", DoneBytes: p.Transferred, TotalBytes: p.Total, RateBitsPerS: p.Throughput,
		Pass: p.Iteration, RemainingBytes: p.Remaining, DirtyBytesPerS: p.DirtyRate, Status: p.Status,
		ExpectedDowntimeMS: float64(p.ExpectedDowntime.Milliseconds())}
	if p.Throughput > 0 {
		d.ETAMS = float64(p.Remaining) * 8 / p.Throughput * 1000
	}
	return d
}

// openJournal writes a new migration's first record (state "started").
func (d *Daemon) openJournal(m *migration, spec []byte) error {
	r := &journal.Record{ID: m.id, Name: m.name, VM: m.vm, Spec: string(spec), Started: m.started.UTC(), State: journal.StateStarted}
	if err := d.journal.Write(r); err != nil {
		return err
	}
	m.jmu.Lock()
	m.jr = r
	m.jmu.Unlock()
	return nil
}

// closeJournal records how a migration's job ended.
func (d *Daemon) closeJournal(m *migration, err error) {
	m.jmu.Lock()
	defer m.jmu.Unlock()
	if m.jr == nil {
		return
	}
	o := journal.Outcome{OK: err == nil, ExitCode: migrator.ExitCode(err), Ended: time.Now().UTC(),
		DurationMS: float64(time.Since(m.started).Microseconds()) / 1000}
	if err != nil {
		o.Error = err.Error()
	}
	if errors.Is(err, migrator.ErrUndo) {
		// Some undo failed: the record stays open, so recovery (at the
		// next start, or vmhop recover --apply) takes it back again.
		d.log.Error("migration failed and could not be fully undone: left for recovery", "id", m.id, "err", err)
		m.jr.Outcome = nil
		defer d.kickRecovery()
	} else {
		m.jr.Close(o)
	}
	if werr := d.journal.Write(m.jr); werr != nil {
		d.log.Error("journal: the outcome was not written", "id", m.id, "err", werr)
	}
	if perr := d.journal.Prune(journalKeep); perr != nil {
		d.log.Warn("journal: prune", "err", perr)
	}
}

// HistoryEntry is a finished migration as the history verb lists it
// (from the journal: it survives restarts).
type HistoryEntry struct {
	ID         string        `json:"id"`
	Name       string        `json:"name"`
	VM         string        `json:"vm"`
	State      journal.State `json:"state"`
	OK         bool          `json:"ok"`
	ExitCode   int           `json:"exit_code"`
	Error      string        `json:"error,omitempty"`
	Started    time.Time     `json:"started"`
	Ended      time.Time     `json:"ended"`
	DurationMS float64       `json:"duration_ms"`
	Recovered  bool          `json:"recovered,omitempty"` // closed by a restarted vmhopd's recovery
	Phases     int           `json:"phases"`              // phases started
}

// History lists the finished migrations in the journal, newest first.
func (d *Daemon) History() ([]HistoryEntry, error) {
	all, err := d.journal.List()
	out := []HistoryEntry{}
	for i := len(all) - 1; i >= 0; i-- {
		r := all[i]
		if r.Open() {
			continue
		}
		o := r.Outcome
		out = append(out, HistoryEntry{ID: r.ID, Name: r.Name, VM: r.VM, State: r.State, OK: o.OK, ExitCode: o.ExitCode,
			Error: o.Error, Started: r.Started, Ended: o.Ended, DurationMS: o.DurationMS, Recovered: o.Recovered, Phases: len(r.Phases)})
	}
	return out, err
}

// RecoveryEntry is one journal record left open (or closed needing a
// retry) and the rule's answer for it.
type RecoveryEntry struct {
	ID       string           `json:"id"`
	Name     string           `json:"name"`
	VM       string           `json:"vm"`
	Started  time.Time        `json:"started"`
	State    journal.State    `json:"state"`
	Done     journal.Done     `json:"done"`
	Recovery journal.Recovery `json:"recovery"` // applied (Daemon.Recover) or planned (RecoveryPlan)
	Error    string           `json:"error,omitempty"`
}

// RecoveryPlan says, for every journal record a recovery would touch,
// what the journal says and what the rule will do, changing nothing.
// Records of migrations running in this vmhopd are left out.
func (d *Daemon) RecoveryPlan() ([]RecoveryEntry, error) {
	recs, err := d.recoverable()
	out := []RecoveryEntry{}
	for _, r := range recs {
		out = append(out, RecoveryEntry{ID: r.ID, Name: r.Name, VM: r.VM, Started: r.Started, State: r.State, Done: r.Done,
			Recovery: journal.Rule(r, journal.Facts{})})
	}
	return out, err
}

func (d *Daemon) recoverable() ([]*journal.Record, error) {
	all, err := d.journal.List()
	running := map[string]bool{}
	for _, s := range d.migs.list() {
		if s.State == "running" {
			running[s.ID] = true
		}
	}
	var out []*journal.Record
	for _, r := range all {
		if running[r.ID] {
			continue
		}
		if rc := journal.Rule(r, journal.Facts{}); rc.Direction != journal.DirNone {
			out = append(out, r)
		}
	}
	return out, err
}

// refuseUnrecovered refuses a migration of a VM whose earlier migration
// the journal holds unfinished (a recovery failed or needs an operator):
// moving it again first would act on a VM in an unknown state.
func (d *Daemon) refuseUnrecovered(spec *config.Migration) error {
	recs, _ := d.recoverable()
	vm := vmKey(spec)
	for _, r := range recs {
		if r.VM == vm {
			rc := journal.Rule(r, journal.Facts{})
			return Errorf(CodeFailedPrecondition, "VM %s has an unfinished migration %q in the journal (%s: %s): see vmhop recover",
				vm, r.ID, r.State, rc.Direction)
		}
	}
	return nil
}

// ErrNoRecoverer: the Migrator cannot rebuild plans from the journal, so
// records stay open for an operator (vmhop recover shows them).
var ErrNoRecoverer = errors.New("the migrator cannot recover migrations (no RecoveryPlanner)")

// Recover takes every journal record a killed vmhopd left to a
// consistent end (journal.Recover through the Migrator's RecoveryPlanner)
// and says what it did. Call it after Listen (the socket is bound: no
// other vmhopd runs) and before Serve, and again whenever an operator asks
// (the local API's recover verb with apply). Records it cannot recover
// stay in the journal, each with the error; without a RecoveryPlanner
// nothing is applied (ErrNoRecoverer) and the plan is logged.
func (d *Daemon) Recover(ctx context.Context) ([]RecoveryEntry, error) {
	out, err := d.recover(ctx)
	if err != nil && !errors.Is(err, ErrNoRecoverer) {
		d.kickRecovery() // tried again in the background (retryRecovery)
	}
	return out, err
}

// kickRecovery asks retryRecovery for a try soon.
func (d *Daemon) kickRecovery() {
	if d.recoverKick == nil {
		return
	}
	select {
	case d.recoverKick <- struct{}{}:
	default:
	}
}

// retryRecovery runs recover again, until it succeeds, after each kick
// (a failed Recover, a job whose undo failed): first after
// Options.RecoveryRetry (2 s), then doubling up to a minute. A job whose
// undo could not reach its destination is so finished once the peer
// answers again, without an operator (the lab fault matrix's
// destination/pre-copy row).
func (d *Daemon) retryRecovery(ctx context.Context) {
	first := d.opts.RecoveryRetry
	if first == 0 {
		first = 2 * time.Second
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.recoverKick:
		}
		for wait := first; ; wait = min(2*wait, time.Minute) {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			_, err := d.recover(ctx)
			if err == nil || errors.Is(err, ErrNoRecoverer) || ctx.Err() != nil {
				break
			}
			d.log.Warn("recovery failed; trying again", "in", min(2*wait, time.Minute), "err", err)
		}
	}
}

func (d *Daemon) recover(ctx context.Context) ([]RecoveryEntry, error) {
	d.recoverMu.Lock()
	defer d.recoverMu.Unlock()
	recs, err := d.recoverable()
	out := []RecoveryEntry{}
	rp, ok := d.opts.Migrator.(RecoveryPlanner)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, r := range recs {
		e := RecoveryEntry{ID: r.ID, Name: r.Name, VM: r.VM, Started: r.Started, State: r.State, Done: r.Done}
		var rerr error
		if !ok {
			e.Recovery, rerr = journal.Rule(r, journal.Facts{}), ErrNoRecoverer
		} else if plan, cleanup, perr := d.timedPlan(ctx, rp, r); perr != nil {
			e.Recovery, rerr = journal.Rule(r, journal.Facts{}), fmt.Errorf("rebuild the plan: %w", perr)
			if cleanup != nil {
				cleanup()
			}
		} else {
			if plan.Log == nil {
				plan.Log = d.log.With("recover", r.ID)
			}
			e.Recovery, rerr = journal.Recover(ctx, d.journal, r, plan)
			if cleanup != nil {
				cleanup()
			}
		}
		e.State, e.Done = r.State, r.Done
		if rerr != nil {
			e.Error = rerr.Error()
			errs = append(errs, fmt.Errorf("%s: %w", r.ID, rerr))
			d.log.Error("recovery", "id", r.ID, "state", e.State, "direction", e.Recovery.Direction, "actions", e.Recovery.Actions, "err", rerr)
		} else {
			d.log.Warn("recovered a migration a previous vmhopd left", "id", r.ID, "state", e.State,
				"direction", e.Recovery.Direction, "actions", e.Recovery.Actions)
		}
		out = append(out, e)
	}
	return out, errors.Join(errs...)
}

// timedPlan is rp.RecoveryPlan, logged with how long it took.
func (d *Daemon) timedPlan(ctx context.Context, rp RecoveryPlanner, r *journal.Record) (*migrator.Plan, func(), error) {
	t0 := time.Now()
	p, cleanup, err := rp.RecoveryPlan(ctx, r)
	d.log.Info("recover: the plan rebuilt from the journal", "id", r.ID, "took", time.Since(t0).Round(time.Millisecond), "err", err)
	return p, cleanup, err
}
