package migrator

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"syscall"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

// RecoveryAction is one step a restarted vmhopd takes for a migration its
// predecessor left unfinished (the journal's recovery rule chooses them;
// Recover carries them out through a Plan).
type RecoveryAction string

// The recovery actions, each through the plan's hosts, driver and DNS.
const (
	// ActProbeSource asks the source hypervisor whether its migration
	// completed (hypervisor.Recoverable): it decides between rolling back
	// and going forward when the memory phase did not end in the journal.
	ActProbeSource RecoveryAction = "probe-source"
	// ActCancelMigration cancels the source's migration (QMP migrate_cancel).
	ActCancelMigration RecoveryAction = "cancel-source-migration"
	// ActRemoveRedirect removes the old address's redirect on the source.
	ActRemoveRedirect RecoveryAction = "remove-redirect"
	// ActResumeSource makes the source VM run (QMP cont if it is paused).
	ActResumeSource RecoveryAction = "resume-source"
	// ActEndDisk ends the disk stream the dead process left (the plan's
	// Disk, if it is a DiskCleaner): the source's mirror job and its
	// target, the destination's export and its end of the stream. Before
	// the commit point it comes before the source resumes (the job's
	// target is gone: guest writes would wait on it); after it, before the
	// source is stopped.
	ActEndDisk RecoveryAction = "end-disk-stream"
	// ActAbortDestination stops the destination hypervisor and removes the
	// VM's entry and the image the migration created there.
	ActAbortDestination RecoveryAction = "abort-destination"
	// ActRestoreDNSTTL puts the record's TTL back to what it was before
	// dns-prepare (the journal's dns_ttl_before_s).
	ActRestoreDNSTTL RecoveryAction = "restore-dns-ttl"
	// ActRetireTunnels stops both hosts accepting the migration's tunnel.
	ActRetireTunnels RecoveryAction = "retire-tunnels"
	// ActCheckHealth runs the plan's health check at the destination (if
	// it has one); a failure stops the actions after it: the source stays
	// paused for an operator.
	ActCheckHealth RecoveryAction = "check-health"
	// ActFlipDNS flips the name from the old address to the new (again).
	ActFlipDNS RecoveryAction = "flip-dns"
	// ActStopSource quits what is left of the VM on the source.
	ActStopSource RecoveryAction = "stop-source"
	// ActFinishDrain runs Drain: the redirect goes once the old address is
	// quiet and resolvers dropped it, then the tunnels are retired.
	ActFinishDrain RecoveryAction = "finish-drain"
)

// DiskCleaner is a storage strategy that can end, from a plan rebuilt
// after a crash (no state of the process that ran the migration), what a
// disk stream left on both hosts. Idempotent.
type DiskCleaner interface {
	Clean(ctx context.Context) error
}

// RecoveryState is what the journal kept that the actions need.
type RecoveryState struct {
	Token          uint64    // the migration's tunnel token
	DNSTTLBefore   uint32    // seconds; 0: not known (the TTL stays low: correct, only cached less)
	DNSCachedUntil time.Time // from the flip: Drain waits at least until then
}

// ProbeSource asks p's driver whether the source's migration completed
// (ActProbeSource). Drivers that are not hypervisor.Recoverable cannot
// say: an error.
func ProbeSource(ctx context.Context, p *Plan) (bool, error) {
	rc, ok := p.Driver.(hypervisor.Recoverable)
	if !ok {
		return false, fmt.Errorf("probe source: the %T driver cannot say whether its migration completed", p.Driver)
	}
	return rc.SourceMigrated(ctx)
}

// SourceGone says whether p's source VM is gone for good (its driver is
// a hypervisor.Liveness that says so), and why. Drivers that cannot tell
// are never gone: recovery retries as before.
func SourceGone(ctx context.Context, p *Plan) (bool, string) {
	if l, ok := p.Driver.(hypervisor.Liveness); ok {
		return l.SourceGone(ctx)
	}
	return false, ""
}

// DestinationStatus is the destination hypervisor's run state for p's
// migration (hypervisor.Liveness); an error if the driver cannot say.
func DestinationStatus(ctx context.Context, p *Plan) (string, error) {
	if l, ok := p.Driver.(hypervisor.Liveness); ok {
		return l.DestinationStatus(ctx)
	}
	return "", fmt.Errorf("destination status: the %T driver cannot say", p.Driver)
}

// Recover carries out actions in order for the migration p describes (p
// as the spec gives it; st from the journal). Every action is tried; the
// errors are joined, each named by its action, except that a failed
// ActCheckHealth stops the ones after it. done, if set, is called after
// each action with its error. ActProbeSource is not an action here
// (ProbeSource): it is skipped.
func Recover(ctx context.Context, p *Plan, st RecoveryState, actions []RecoveryAction, done func(RecoveryAction, error)) error {
	if p.Log == nil {
		p.Log = slog.Default()
	}
	p.Token = st.Token
	p.dnsCachedUntil = st.DNSCachedUntil
	// A source known gone is not dialled (QEMU's dial waits 10 s for it).
	if rc, ok := p.Driver.(hypervisor.Recoverable); ok && !goneOnly(SourceGone(ctx, p)) {
		if err := rc.ConnectSource(ctx); err != nil {
			p.Log.Warn("recover: source hypervisor", "err", err)
		}
	}
	var errs []error
	for _, a := range actions {
		t0 := time.Now()
		err := p.recoverOne(ctx, a, st)
		p.Log.Info("recover: action", "action", a, "took", time.Since(t0).Round(time.Millisecond), "err", err)
		if done != nil {
			done(a, err)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", a, err))
			if a == ActCheckHealth {
				break
			}
		}
	}
	return errors.Join(errs...)
}

// goneOnly is SourceGone's first result.
func goneOnly(gone bool, _ string) bool { return gone }

func (p *Plan) recoverOne(ctx context.Context, a RecoveryAction, st RecoveryState) error {
	switch a {
	case ActProbeSource:
		return nil
	case ActCancelMigration:
		if rc, ok := p.Driver.(hypervisor.Recoverable); ok {
			return rc.CancelMigration(ctx)
		}
		return nil
	case ActRemoveRedirect:
		return p.Source.RemoveRedirect(ctx, RedirectRemove{OldIP: p.OldIP})
	case ActResumeSource:
		return p.Driver.ResumeSource(ctx)
	case ActEndDisk:
		if c, ok := p.Disk.(DiskCleaner); ok {
			return c.Clean(ctx)
		}
		return nil
	case ActAbortDestination:
		return errors.Join(p.Driver.AbortDestination(ctx),
			p.Dest.Abort(ctx, DestAbort{OldIP: p.OldIP, NewIP: p.NewIP, Image: p.DestDisk}))
	case ActRestoreDNSTTL:
		if p.DNS == nil || st.DNSTTLBefore == 0 {
			return nil
		}
		_, err := p.DNS.Restore(ctx, p.Zone, p.DNSName, st.DNSTTLBefore)
		return err
	case ActRetireTunnels:
		return errors.Join(p.Source.RetireTunnel(ctx, p.tunnel(p.DestWAN)), p.Dest.RetireTunnel(ctx, p.tunnel(p.SourceWAN)))
	case ActCheckHealth:
		if !p.Health.Enabled() {
			return nil
		}
		_, err := p.Health.Wait(ctx)
		return err
	case ActFlipDNS:
		if p.DNS == nil {
			return nil
		}
		res, err := p.DNS.Flip(ctx, p.Zone, p.DNSName, []netip.Addr{p.OldIP}, []netip.Addr{p.NewIP}, p.TTL)
		if err == nil {
			// dns-prepare waited out the TTL before it long ago: resolvers
			// hold the old address for the TTL it had at this flip.
			p.dnsCachedUntil = later(p.dnsCachedUntil, time.Now().Add(time.Duration(res.Before.MaxTTL())*time.Second))
		}
		return err
	case ActStopSource:
		if gone, why := SourceGone(ctx, p); gone {
			p.Log.Info("recover: the source VM is gone already", "why", why)
			return nil
		}
		if rc, ok := p.Driver.(hypervisor.Recoverable); ok {
			if err := rc.ConnectSource(ctx); errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
				p.Log.Info("recover: the source VM is gone already (its QMP socket does not answer)", "err", err)
				return nil
			}
		}
		return p.Driver.StopSource(ctx)
	case ActFinishDrain:
		_, err := Drain(ctx, p)
		return err
	}
	return fmt.Errorf("unknown recovery action %q", a)
}
