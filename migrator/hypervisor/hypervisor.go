// Package hypervisor is what the migrator needs from a hypervisor's live
// migration, and nothing more: ready a destination, migrate with bandwidth
// and downtime limits while reporting progress, stop at a switchover hook
// with the source paused and the destination not yet running, and undo.
// Drivers live in subpackages (qemu, virtualbox).
package hypervisor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

// Options limit one migration.
type Options struct {
	// Bandwidth caps the migration stream.
	Bandwidth units.Bitrate
	// Downtime is the pause the hypervisor aims for at switchover.
	Downtime time.Duration
	// AutoConverge lets the hypervisor throttle a guest that dirties memory
	// faster than it can be sent.
	AutoConverge bool
	// MaxIterations is how many passes over memory the watchdog allows
	// before it acts (0: no limit).
	MaxIterations int
	// Deadline bounds the whole migration (0: none).
	Deadline time.Duration
	// MaxDowntime, when above Downtime, lets the watchdog escalate a stalled
	// migration by doubling the downtime limit up to it before aborting.
	MaxDowntime time.Duration
}

// Progress is one report of a running migration.
type Progress struct {
	Status           string        // driver's state name, e.g. "active", "pre-switchover", "completed"
	Elapsed          time.Duration // since the migration started
	Transferred      uint64        // bytes of guest memory sent so far
	Remaining        uint64        // bytes still to send in this pass
	Total            uint64        // guest memory size
	DirtyRate        uint64        // bytes per second the guest dirties
	Iteration        uint64        // passes over memory so far
	Throughput       float64       // bits per second
	ExpectedDowntime time.Duration // the hypervisor's estimate of the final pause
	Throttle         int           // percent of guest CPU taken away by auto-converge
}

func (p Progress) String() string {
	return fmt.Sprintf("%s %s: %d/%d MiB sent, %d MiB left, pass %d, dirty %.1f MiB/s, %.1f Mbit/s, expected downtime %s",
		p.Status, p.Elapsed.Round(100*time.Millisecond), p.Transferred>>20, p.Total>>20, p.Remaining>>20,
		p.Iteration, float64(p.DirtyRate)/(1<<20), p.Throughput/1e6, p.ExpectedDowntime)
}

// Result summarises a completed migration.
type Result struct {
	Total       time.Duration // start to completion
	Downtime    time.Duration // as the hypervisor reports it (includes the switchover hook)
	Hook        time.Duration // time spent in the switchover hook
	HookAt      time.Time     // when the switchover hook started
	HookLag     time.Duration // from the source's stop (QEMU's event time) to the hook's start; 0: not known
	Transferred uint64        // bytes sent
	Iterations  uint64        // passes over memory
}

// Switchover runs with the source paused and the destination not yet
// resumed: the final storage delta and the network switch go here. An error
// aborts the migration; the source then runs again.
type Switchover func(ctx context.Context) error

// Driver migrates one VM to one destination. Cancelling Migrate's context
// cancels the migration: the source keeps running.
type Driver interface {
	// PrepareDestination readies the destination to receive the VM (for
	// QEMU: starts a paused QEMU that listens for the stream).
	PrepareDestination(ctx context.Context) error
	// Migrate runs the migration to completion, sending progress reports on
	// progress (if not nil; never blocks on it) and calling switchover once.
	// On error the source is running and the destination may be torn down
	// with AbortDestination.
	Migrate(ctx context.Context, opts Options, progress chan<- Progress, switchover Switchover) (Result, error)
	// ResumeSource restarts the source after a migration that completed but
	// whose destination then failed.
	ResumeSource(ctx context.Context) error
	// AbortDestination tears the destination down; the source is untouched.
	AbortDestination(ctx context.Context) error
	// StopSource ends what is left of the VM on the source once it runs at
	// the destination (QEMU: quit; VirtualBox: nothing, teleport powered
	// it off).
	StopSource(ctx context.Context) error
}

// Preflighter is a Driver that can check a prepared destination before
// the migration starts (qemu: TCGDirtySyncRisk): warnings do not stop
// it, an error does.
type Preflighter interface {
	Preflight(ctx context.Context) (warnings []string, err error)
}

// BandwidthSetter is a Driver whose memory stream's cap can change while
// it runs (QEMU's max-bandwidth). The migrator gives it what the disk
// stream leaves of the migration's budget; drivers without it keep
// Options.Bandwidth.
type BandwidthSetter interface {
	// SetBandwidth sets the memory stream's cap, in bytes per second.
	SetBandwidth(ctx context.Context, bytesPerSecond uint64) error
}

// Errors a Driver returns (wrapped) so the orchestrator can tell causes apart.
var (
	ErrCancelled         = errors.New("migration cancelled")
	ErrNotConverging     = errors.New("migration not converging")
	ErrSwitchover        = errors.New("switchover hook failed")
	ErrDestinationFailed = errors.New("destination failed")
)

// Recoverable is a Driver a restarted vmhopd can use on a migration its
// predecessor left (the journal's recovery): reconnect to the source,
// ask whether the source's migration completed (the destination then
// holds the VM: go forward), and cancel one that did not.
type Recoverable interface {
	// ConnectSource reconnects to the source hypervisor (idempotent).
	ConnectSource(ctx context.Context) error
	// SourceMigrated says whether the source's last migration completed
	// (QEMU: query-migrate "completed", or the run state "postmigrate").
	SourceMigrated(ctx context.Context) (bool, error)
	// CancelMigration cancels the source's migration if one runs or waits
	// (QEMU: migrate_cancel); none running is not an error.
	CancelMigration(ctx context.Context) error
}

// Liveness is a Recoverable driver that can tell a source VM that is
// gone for good from one unreachable for a moment, and ask the
// destination how far its copy got: a recovery before the commit point
// whose source VM died uses it to roll back without the source, or to
// leave the decision to an operator.
type Liveness interface {
	// SourceGone says whether the source VM's hypervisor process is gone
	// (QEMU: its QMP socket is missing or refuses connections, and no
	// process names the socket); why says what was found. Anything else
	// (a timeout, a full backlog, a permission error) is not gone.
	SourceGone(ctx context.Context) (gone bool, why string)
	// DestinationStatus is the destination hypervisor's run state for
	// the migration (QEMU's query-status: "inmigrate" while it waits for
	// the stream, "running" once the VM runs there); an error if it
	// cannot say.
	DestinationStatus(ctx context.Context) (string, error)
}

// ByteReporter is a Driver whose progress reports carry the bytes sent,
// at least every few seconds while the stream runs (QEMU's do; a
// VirtualBox teleport reports 10% steps only). The migrator's stall
// watchdog (migrator.Plan.StallTimeout) watches only such drivers: for
// them, reports without new bytes mean the stream stalled.
type ByteReporter interface {
	ReportsBytes() bool
}
