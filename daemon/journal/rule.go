package journal

import (
	"cmp"
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
	// SourceGone, if set, says why the source VM is gone for good: its
	// hypervisor process exited (migrator.SourceGone; asked before the
	// commit point only). A source unreachable for a moment is not gone.
	SourceGone string `json:"source_gone,omitempty"`
	// DestStatus is the destination hypervisor's run state, asked when
	// the source is gone inside the memory stream: "inmigrate" (it never
	// got the VM), "running" (it runs the VM), "unknown: ERR" (it could
	// not say); "" not asked.
	DestStatus string `json:"dest_status,omitempty"`
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

// rollBackGone is rollBack without the source VM (it is gone): nothing to
// cancel or resume there.
var rollBackGone = []migrator.RecoveryAction{migrator.ActRemoveRedirect, migrator.ActEndDisk,
	migrator.ActAbortDestination, migrator.ActRestoreDNSTTL, migrator.ActRetireTunnels}

// Rule is the recovery for a record in its state, given what the hosts
// said (facts): a pure function (docs/architecture.md has the table).
//
//   - started: nothing was done: none.
//   - preparing, copying: the source VM never paused: undo what the
//     flags say may exist (disk stream and destination, DNS TTL, redirect,
//     tunnels). None of it acts on the source VM, so a source VM that is
//     gone (Facts.SourceGone) changes only the why and the outcome:
//     Recover closes the record failed, saying the VM is not running, its
//     disk image on the source is untouched, and it must be started again.
//   - switching: undecided until the source is asked; if its migration
//     completed, forward as committed; if not, roll back (cancel, redirect
//     off, end the disk stream, resume, abort the destination, DNS TTL,
//     tunnels). With the source VM gone (Facts.SourceGone) the source
//     cannot be asked, so the destination is (Facts.DestStatus):
//     "inmigrate" (it never got the VM): roll back without the source
//     (redirect off, end the disk stream, abort the destination, DNS TTL,
//     tunnels), closed failed as above; "running" (the stream completed:
//     committed, not journalled): forward, since the destination holds
//     the only copy; anything else or no answer: operator, nothing
//     automatic (an abort could destroy the only copy of the VM).
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
		if f.SourceGone != "" {
			rc.Why = "before the memory stream, and the source VM is not running (" + f.SourceGone +
				"): undo what the migration did at the destination, DNS and the datapath; the VM must be started again on the source"
		}
		if d.Destination {
			rc.Actions = append(rc.Actions, migrator.ActEndDisk, migrator.ActAbortDestination)
		}
		if d.DNSPrepared {
			rc.Actions = append(rc.Actions, migrator.ActRestoreDNSTTL)
		}
		rc.Actions = append(rc.Actions, migrator.ActRemoveRedirect, migrator.ActRetireTunnels)
	case StateSwitching:
		switch {
		case f.SourceGone != "" && f.DestStatus == "inmigrate":
			rc.Direction = DirRollBack
			rc.Why = "inside the memory stream, the source VM is not running (" + f.SourceGone +
				") and the destination never got it (still waiting for the stream): undo the destination, DNS and the datapath; the VM must be started again on the source"
			rc.Actions = append([]migrator.RecoveryAction(nil), rollBackGone...)
		case f.SourceGone != "" && f.DestStatus == "running":
			rc.Direction = DirForward
			rc.Why = "inside the memory stream, the source VM is not running (" + f.SourceGone +
				") and the destination runs it: the migration committed; forward"
			rc.Actions = forward(d)
		case f.SourceGone != "":
			rc.Direction = DirOperator
			rc.Why = "inside the memory stream, the source VM is not running (" + f.SourceGone +
				") and the destination's VM is " + cmp.Or(f.DestStatus, "unknown") + ": it may hold the only copy, so nothing automatic; " +
				"check the destination: if its VM does not run, start the VM again on the source and run vmhop recover --apply (it rolls back the rest: " +
				"destination, DNS TTL, redirect, tunnels); if it runs, the VM moved: flip DNS (vmhop dns flip) and remove the redirect"
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
// from rec.Spec): before the commit point it first asks whether the
// source VM is gone for good (migrator.SourceGone; inside the memory
// stream then the destination's state, migrator.DestinationStatus), and
// a rolled-back record whose source VM is gone is closed failed with an
// error naming the VM, its untouched disk image and that it must be
// started again (not retried: nothing more can be done without it). It
// asks the source hypervisor when the rule needs it,
// applies the rule's actions with the journal as plan.OnPhase (so a crash
// during recovery leaves a record the next start continues from), and
// closes the record (Outcome.Recovered; the exit code the outcome
// deserves). The record is written to s after each step.
func Recover(ctx context.Context, s *Store, rec *Record, plan *migrator.Plan) (Recovery, error) {
	f := sourceFacts(ctx, rec, plan)
	rc := Rule(rec, f)
	if rc.Direction == DirForward && f.SourceGone != "" && !rec.Done.Committed {
		// The destination runs the VM: committed from here on.
		rec.Done.Committed = true
		rec.State = rec.Done.state(rec.Outcome)
	}
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
		if f.SourceGone != "" {
			o.Error = goneError(rec, plan, f.SourceGone)
		}
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

// sourceFacts asks, for an open record before the commit point, whether
// the source VM is gone for good, and inside the memory stream then the
// destination's state. Nothing asked otherwise.
func sourceFacts(ctx context.Context, rec *Record, plan *migrator.Plan) Facts {
	var f Facts
	if !rec.Open() || rec.Done.Committed ||
		(rec.State != StatePreparing && rec.State != StateCopying && rec.State != StateSwitching) {
		return f
	}
	gone, why := migrator.SourceGone(ctx, plan)
	if !gone {
		return f
	}
	f.SourceGone = why
	if rec.State == StateSwitching {
		st, err := migrator.DestinationStatus(ctx, plan)
		if err != nil {
			st = "unknown: " + err.Error()
		}
		f.DestStatus = st
	}
	return f
}

// goneError is the outcome's error of a migration rolled back without
// its source VM: which VM, that it is not running, and what to do.
func goneError(rec *Record, plan *migrator.Plan, why string) string {
	disk := "its disk image"
	if plan.SourceDisk != "" {
		disk += " " + plan.SourceDisk
	}
	dest := "the destination"
	if plan.Label != "" {
		dest += " (" + plan.Label + ")"
	}
	return fmt.Sprintf("the source VM %s is not running (%s): its hypervisor exited before the migration's commit point. "+
		"Rolled back by recovery: nothing of the migration is left at %s, DNS still names the old address; "+
		"%s on the source is untouched by the migration. Start the VM again on the source", rec.VM, why, dest, disk)
}
