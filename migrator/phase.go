package migrator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

// PhaseEvent is a phase's start or end, as Plan.OnPhase gets it: what a
// journal must hold to undo or finish the migration after the process
// running it died.
type PhaseEvent struct {
	// Phase is the phase's name: datapath, dns-prepare, destination,
	// disk-bulk, disk-prehash, memory, disk-release, health, dns-flip,
	// dns-restore, source-cleanup (Run), drain (Drain).
	Phase string
	// End is false before the phase acts, true once it returned.
	End bool
	// Err is the phase's error, at its end ("" if it succeeded).
	Err string
	// Duration is how long the phase took (at its end).
	Duration time.Duration
	// Committed: the VM runs at the destination (the memory phase ended
	// without error): from here on the migration goes forward.
	Committed bool
	// Token is the migration's tunnel token (Plan.Token), never 0.
	Token uint64
	// DNSTTLBefore is the record's TTL before dns-prepare lowers it, in
	// seconds, from dns-prepare's start on (read just before; 0: not
	// lowered, or DNS could not be read): what a rollback restores.
	DNSTTLBefore uint32
	// DNSCachedUntil is, after dns-flip, until when resolvers may hold the
	// old address (the drain keeps the redirect until then).
	DNSCachedUntil time.Time
}

// phase calls p.OnPhase, if set.
func (p *Plan) phase(ctx context.Context, ev PhaseEvent) error {
	if p.OnPhase == nil {
		return nil
	}
	if err := p.OnPhase(ctx, ev); err != nil {
		when := "before"
		if ev.End {
			when = "after"
		}
		return fmt.Errorf("phase hook %s %s: %w", when, ev.Phase, err)
	}
	return nil
}

// hook calls the plan's OnPhase for phase name with what the run knows.
func (r *run) hook(ctx context.Context, name string, end bool, err error, took time.Duration) error {
	if r.p.OnPhase == nil {
		return nil
	}
	r.mu.Lock()
	ev := PhaseEvent{Phase: name, End: end, Duration: took, Committed: r.committed, Token: r.p.Token,
		DNSCachedUntil: r.p.dnsCachedUntil}
	switch {
	case r.dnsPre != nil && r.dnsPre.Changed:
		ev.DNSTTLBefore = r.dnsPre.Before.MaxTTL()
	case r.dnsPre == nil && r.dnsShownTTL > r.p.TTL:
		ev.DNSTTLBefore = r.dnsShownTTL // read before prepare: what it will lower
	}
	r.mu.Unlock()
	if err != nil {
		ev.Err = err.Error()
	}
	return r.p.phase(ctx, ev)
}

func (r *run) setCommitted() {
	r.mu.Lock()
	r.committed = true
	r.mu.Unlock()
}

// DefaultStallTimeout is Plan.StallTimeout's default: how long the memory
// stream may make no progress before the migration is aborted.
const DefaultStallTimeout = 60 * time.Second

// ErrStalled is the memory stream making no progress for
// Plan.StallTimeout: the migration was aborted and the source resumed.
var ErrStalled = errors.New("memory stream stalled")

// watchdog watches the driver's progress reports during the memory phase
// and cancels the driver's context when the bytes sent stop growing for
// the plan's StallTimeout (the time inside the switchover hook is not
// counted: the hook has its own work, and the driver reports nothing
// then). The driver's cancel path aborts the migration and resumes the
// source.
type watchdog struct {
	ctx      context.Context
	cancel   context.CancelCauseFunc
	progress chan hypervisor.Progress
	inHook   atomic.Bool
	fired    atomic.Bool
	done     chan struct{}
	once     sync.Once
}

func (r *run) newWatchdog(parent context.Context) *watchdog {
	p := r.p
	ctx, cancel := context.WithCancelCause(parent)
	w := &watchdog{ctx: ctx, cancel: cancel, progress: make(chan hypervisor.Progress, 16), done: make(chan struct{})}
	limit := p.StallTimeout
	if limit == 0 {
		limit = DefaultStallTimeout
	}
	if br, ok := p.Driver.(hypervisor.ByteReporter); !ok || !br.ReportsBytes() {
		limit = -1 // coarse progress (VirtualBox's 10% steps): no watchdog
	}
	go w.run(limit, p.Progress)
	return w
}

// run forwards progress to out (never blocking) and fires on a stall.
func (w *watchdog) run(limit time.Duration, out chan<- hypervisor.Progress) {
	every := max(min(limit/4, time.Second), time.Millisecond)
	tick := time.NewTicker(every)
	defer tick.Stop()
	var (
		armed    bool
		last     uint64
		lastIter uint64
		moved    time.Time // last time the stream advanced (or the hook ended)
		status   string
	)
	for {
		select {
		case <-w.done:
			return
		case pr := <-w.progress:
			if out != nil {
				select {
				case out <- pr:
				default:
				}
			}
			if !armed || pr.Transferred != last || pr.Iteration != lastIter {
				armed, last, lastIter, moved = true, pr.Transferred, pr.Iteration, time.Now()
			}
			status = pr.Status
		case <-tick.C:
		}
		if w.inHook.Load() {
			moved = time.Now()
			continue
		}
		if limit > 0 && armed && time.Since(moved) > limit && !w.fired.Load() {
			w.fired.Store(true)
			w.cancel(fmt.Errorf("%w: no progress for %s (%d bytes sent, status %q)", ErrStalled, limit, last, status))
		}
	}
}

// hook marks the switchover hook's start and end.
func (w *watchdog) hook(in bool) { w.inHook.Store(in) }

func (w *watchdog) stop() {
	w.once.Do(func() { close(w.done); w.cancel(nil) })
}

// explain makes a driver's error after the watchdog fired say so (and
// errors.Is ErrStalled).
func (w *watchdog) explain(err error) error {
	if err == nil || !w.fired.Load() {
		return err
	}
	cause := context.Cause(w.ctx)
	if errors.Is(err, ErrStalled) {
		return err
	}
	msg := err.Error()
	if !strings.Contains(msg, cause.Error()) {
		msg = cause.Error() + " (" + msg + ")"
	}
	return stalledError{msg: msg, errs: []error{cause, err}}
}

// stalledError is the driver's error after the watchdog fired: it is
// ErrStalled and the driver's error, said once.
type stalledError struct {
	msg  string
	errs []error
}

func (e stalledError) Error() string   { return e.msg }
func (e stalledError) Unwrap() []error { return e.errs }
