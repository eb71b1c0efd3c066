package journal

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmhop/vmhop/migrator"
)

// Direction is which way recovery takes a migration.
type Direction string

// The directions.
const (
	DirNone      Direction = "none"      // nothing to do: the record is consistent
	DirRollBack  Direction = "roll-back" // before the commit point: the VM runs on the source again
	DirForward   Direction = "forward"   // after it: finish the move (flip, stop the source, drain)
	DirUndecided Direction = "undecided" // the source hypervisor must be asked first (Facts.SourceMigrated)
	DirOperator  Direction = "operator"  // nothing automatic: a person decides (health check failed)
)

// Facts are what recovery learned from the hosts before applying the
// rule.
type Facts struct {
	// SourceMigrated: the source hypervisor says its migration completed
	// (the destination holds the VM). nil: not asked (or it could not say).
	SourceMigrated *bool `json:"source_migrated,omitempty"`
}

// Recovery is the rule's answer for a record: which way, why, and the
// actions in the order they run.
type Recovery struct {
	State     State                     `json:"state"`
	Direction Direction                 `json:"direction"`
	Why       string                    `json:"why"`
	Actions   []migrator.RecoveryAction `json:"actions"`
	Facts     Facts                     `json:"facts"`
	// Set once applied:
	Applied time.Time `json:"applied,omitzero"`
	Error   string    `json:"error,omitempty"`
}

// rollBack is every undo that may be needed once the memory stream
// started, in order: stop the migration, take the redirect off before the
// source resumes (its packets would go to a destination being torn down),
// end the disk stream (a mirror job left on the source would hold guest
// writes on a target that is gone), resume the source, then clear the
// destination, DNS and the tunnels.
var rollBack = []migrator.RecoveryAction{migrator.ActCancelMigration, migrator.ActRemoveRedirect, migrator.ActEndDisk,
	migrator.ActResumeSource, migrator.ActAbortDestination, migrator.ActRestoreDNSTTL, migrator.ActRetireTunnels}

// Rule is the recovery for a record in its state, given what the hosts
// said (facts): a pure function (docs/architecture.md has the table).
//
//   - started: nothing was done: none.
//   - preparing, copying: the source VM never paused: undo what the
//     flags say may exist (disk stream and destination, DNS TTL, redirect,
//     tunnels).
//   - switching: undecided until the source is asked; if its migration
//     completed, forward as committed; if not, roll back (cancel, redirect
//     off, end the disk stream, resume, abort the destination, DNS TTL,
//     tunnels).
//   - committed: forward: health check, DNS flip and TTL, end the disk
//     stream, stop the source, drain (each unless the record says it
//     ended).
//   - kept: operator: the source is kept paused, DNS unchanged.
//   - flipped, draining: forward: what is left of stopping the source and
//     the drain.
//   - drained, rolled-back: none. A closed record (with an outcome) whose
//     job ended with the DNS flip failed is still taken forward: the flip
//     is retried.
func Rule(r *Record, f Facts) Recovery {
	d := r.Done
	rc := Recovery{State: r.State, Facts: f}
	if !r.Open() {
		switch {
		case d.Committed && d.DNSFlipFail && !d.DNSFlipped:
			rc.Direction, rc.Why = DirForward, "the job ended with the DNS flip failed: retry it"
			rc.Actions = []migrator.RecoveryAction{migrator.ActFlipDNS, migrator.ActRestoreDNSTTL}
		case d.Draining && !d.Drained:
			rc.Direction, rc.Why = DirForward, "the job ended inside the drain: finish it"
			rc.Actions = []migrator.RecoveryAction{migrator.ActFinishDrain}
		default:
			rc.Direction, rc.Why = DirNone, "closed: the job ended and recorded its outcome"
		}
		return rc
	}
	switch r.State {
	case StateStarted:
		rc.Direction, rc.Why = DirNone, "nothing was done on any host"
	case StatePreparing, StateCopying:
		rc.Direction, rc.Why = DirRollBack, "before the memory stream: the source VM never paused"
		if d.Destination {
			rc.Actions = append(rc.Actions, migrator.ActEndDisk, migrator.ActAbortDestination)
		}
		if d.DNSPrepared {
			rc.Actions = append(rc.Actions, migrator.ActRestoreDNSTTL)
		}
		rc.Actions = append(rc.Actions, migrator.ActRemoveRedirect, migrator.ActRetireTunnels)
	case StateSwitching:
		switch {
		case f.SourceMigrated == nil:
			rc.Direction, rc.Why = DirUndecided, "inside the memory stream: the source hypervisor says whether it completed"
			rc.Actions = []migrator.RecoveryAction{migrator.ActProbeSource}
		case *f.SourceMigrated:
			rc.Direction, rc.Why = DirForward, "the source's migration completed: the VM runs at the destination"
			rc.Actions = forward(d)
		default:
			rc.Direction, rc.Why = DirRollBack, "the source's migration did not complete: the VM goes back to the source"
			rc.Actions = append([]migrator.RecoveryAction(nil), rollBack...)
		}
	case StateCommitted, StateFlipped, StateDraining:
		rc.Direction, rc.Why = DirForward, "after the commit point: the VM runs at the destination"
		rc.Actions = forward(d)
	case StateKept:
		rc.Direction = DirOperator
		rc.Why = "the health check failed: the source VM is kept paused, DNS unchanged, the redirect on; " +
			"fall back (stop the destination VM, remove the redirect, QMP cont on the source) or flip DNS (vmhop dns flip)"
	default:
		rc.Direction, rc.Why = DirNone, "nothing left"
	}
	return rc
}

// forward is what is left after the commit point, by the flags.
func forward(d Done) []migrator.RecoveryAction {
	var a []migrator.RecoveryAction
	if !d.HealthPassed && !d.DNSFlipped {
		a = append(a, migrator.ActCheckHealth)
	}
	if d.DNSPrepared && !d.DNSFlipped {
		a = append(a, migrator.ActFlipDNS)
	}
	if d.DNSPrepared && !d.DNSRestored {
		a = append(a, migrator.ActRestoreDNSTTL)
	}
	if !d.DiskReleased {
		a = append(a, migrator.ActEndDisk)
	}
	if !d.SourceStop {
		a = append(a, migrator.ActStopSource)
	}
	if !d.Drained {
		a = append(a, migrator.ActFinishDrain)
	}
	return a
}

// Recover takes rec to a consistent end through plan (the plan rebuilt
// from rec.Spec): it asks the source hypervisor when the rule needs it,
// applies the rule's actions with the journal as plan.OnPhase (so a crash
// during recovery leaves a record the next start continues from), and
// closes the record (Outcome.Recovered; the exit code the outcome
// deserves). The record is written to s after each step.
func Recover(ctx context.Context, s *Store, rec *Record, plan *migrator.Plan) (Recovery, error) {
	rc := Rule(rec, Facts{})
	if rc.Direction == DirUndecided {
		moved, err := migrator.ProbeSource(ctx, plan)
		if err != nil {
			rc.Error = err.Error()
			rec.Recovery = &rc
			return rc, errors.Join(fmt.Errorf("recover %s: %w", rec.ID, err), s.Write(rec))
		}
		rc = Rule(rec, Facts{SourceMigrated: &moved})
		if moved {
			// Committed from here on: a crash now recovers forward.
			rec.Done.Committed = true
			rec.State = rec.Done.state(rec.Outcome)
		}
	}
	if rc.Direction == DirNone || rc.Direction == DirOperator {
		rec.Recovery = &rc
		if rc.Direction == DirNone && rec.Open() {
			// Left open with nothing to do: nothing was done yet, or the
			// drain ended before the job could record its outcome.
			now := time.Now().UTC()
			o := Outcome{OK: rec.Done.Committed, Ended: now, Recovered: true,
				DurationMS: float64(now.Sub(rec.Started).Microseconds()) / 1000}
			if !o.OK {
				o.ExitCode, o.Error = migrator.ExitAborted, "vmhopd stopped before the migration changed anything"
			}
			rec.Close(o)
		}
		return rc, s.Write(rec)
	}
	rec.Recovery = &rc
	if err := s.Write(rec); err != nil {
		return rc, err
	}
	plan.OnPhase = func(_ context.Context, ev migrator.PhaseEvent) error {
		rec.Apply(ev, time.Now().UTC())
		return s.Write(rec)
	}
	st := migrator.RecoveryState{Token: rec.Token, DNSTTLBefore: rec.DNSTTLBeforeS, DNSCachedUntil: rec.DNSCachedUntil}
	err := migrator.Recover(ctx, plan, st, rc.Actions, func(a migrator.RecoveryAction, aerr error) {
		if aerr != nil {
			if a == migrator.ActCheckHealth {
				rec.Done.HealthFailed = true // kept: an operator decides
			}
			return
		}
		switch a {
		case migrator.ActFlipDNS:
			rec.Done.DNSFlipped, rec.Done.DNSFlipFail = true, false
		case migrator.ActRestoreDNSTTL:
			rec.Done.DNSRestored = true
		case migrator.ActStopSource:
			rec.Done.SourceStop = true
		case migrator.ActCheckHealth:
			rec.Done.HealthPassed = true
		}
	})
	rc.Applied = time.Now().UTC()
	if err != nil {
		rc.Error = err.Error()
	}
	rec.Recovery = &rc
	o := Outcome{OK: err == nil && rc.Direction == DirForward, Ended: rc.Applied, Recovered: true, Error: rc.Error,
		DurationMS: float64(rc.Applied.Sub(rec.Started).Microseconds()) / 1000}
	if rc.Direction == DirRollBack {
		o.ExitCode, o.Error = migrator.ExitAborted, "rolled back by recovery after vmhopd restarted"
	}
	if err == nil {
		rec.Close(o)
	} else {
		// Open: the next start (or vmhop recover --apply) tries again;
		// every action is idempotent.
		rec.State = rec.Done.state(nil)
	}
	return rc, errors.Join(err, s.Write(rec))
}
