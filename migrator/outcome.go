package migrator

import (
	"errors"
)

// ErrFollowUp wraps the error of a step after the commit point that is not
// the health check (the DNS flip, the drain): the VM moved and runs at the
// destination, but something after it failed.
var ErrFollowUp = errors.New("moved, but a follow-up failed")

// Exit codes of `vmhop migrate`, one per outcome an operator scripts on.
const (
	ExitMoved     = 0 // the VM runs at the destination; every step passed
	ExitAborted   = 1 // failed before the commit point: the VM runs on the source, its disk intact, DNS unchanged
	ExitUsage     = 2 // bad flags or spec: nothing was attempted
	ExitFollowUp  = 3 // moved, but a follow-up failed (DNS flip, drain): see the error
	ExitUnhealthy = 4 // moved, but the VM does not answer at the destination; the source is kept paused
)

// ExitCode maps a migration's error to its exit code. Errors that are not
// ErrUnhealthy or ErrFollowUp are failures before the commit point (Run
// undoes them). Usage errors are the caller's to tell apart.
func ExitCode(err error) int {
	switch {
	case err == nil:
		return ExitMoved
	case errors.Is(err, ErrUnhealthy):
		return ExitUnhealthy
	case errors.Is(err, ErrFollowUp):
		return ExitFollowUp
	}
	return ExitAborted
}
