package storage

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// The disk stream's pacing (the spec's limits.pacing).
const (
	// PacingOff leaves the socket unpaced: the token bucket in front holds
	// the average, the kernel sends each window at line rate.
	PacingOff = "off"
	// PacingBudget has the kernel pace the socket at the budget.
	PacingBudget = "budget"
	// PacingYield paces at the budget while the path's queue stays short
	// and lower while it grows (see yieldStep): the disk stream gives way
	// to whatever else crosses the uplink, the VM's own clients first.
	PacingYield = "yield"
)

// WANTuning is how a migration stream's WAN socket (the disk stream's;
// the memory stream's when vmhopd dials it for QEMU) yields to the VM's
// own traffic on the source's uplink (the spec's limits.pacing and
// limits.congestion).
type WANTuning struct {
	// Pacing is PacingOff, PacingBudget or PacingYield ("" is off). Kernel
	// pacing (SO_MAX_PACING_RATE: TCP's internal pacing, Linux >= 4.13, no
	// fq needed) sends segments evenly spaced instead of in window-sized
	// bursts at line rate, which fill the uplink's queue in front of the
	// VM's packets even when the average is under the budget.
	Pacing string
	// Congestion is the socket's TCP congestion control ("bbr", "cubic",
	// ...); "" keeps the host's default.
	Congestion string
}

// Active says whether t changes a socket at all (Pacing budget or yield,
// or a congestion control named).
func (t WANTuning) Active() bool {
	return t.Pacing == PacingBudget || t.Pacing == PacingYield || t.Congestion != ""
}

// errTuning wraps a socket option the host refused (no redial mends it).
var errTuning = errors.New("disk stream socket")

// pacingHeadroom is the pacing rate over the budget: the token bucket in
// front (paced) counts NBD bytes, the kernel paces TLS records (~0.1% more).
// The bucket stays what holds the average; pacing only spreads its bursts.
const pacingHeadroom = 1.02

// apply sets t on c (a *net.TCPConn; anything else is left alone, as a
// test's pipe is) with the rate of limit in bytes per second (nil or
// unlimited: no pacing). See Apply.
func (t WANTuning) apply(c net.Conn, limit *rate.Limiter) (*Pacer, error) {
	var bps float64
	if limit != nil && limit.Limit() != rate.Inf && limit.Limit() > 0 {
		bps = float64(limit.Limit())
	}
	return t.Apply(c, bps)
}

// Apply sets t on c (a *net.TCPConn; anything else is left alone) for a
// stream of budget bytes per second (0: unlimited, no pacing): the
// congestion control, and the pacing rate (a little over the budget:
// the TLS records' overhead). PacingYield starts a goroutine that adjusts
// the rate every yieldEvery until c is closed or the pacing is lifted.
// The Pacer returned lifts the pacing for the switchover's pause (nil,
// and safe to Lift, when c is not paced). An unknown congestion control
// is an error naming what the host offers.
func (t WANTuning) Apply(c net.Conn, budget float64) (*Pacer, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil, nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil, err
	}
	if t.Pacing != PacingBudget && t.Pacing != PacingYield {
		budget = 0
	}
	budget *= pacingHeadroom
	if budget >= float64(^uint32(0)) {
		budget = 0 // above what SO_MAX_PACING_RATE takes (~34 Gbit/s): no pacing needed
	}
	var serr error
	cerr := raw.Control(func(fd uintptr) {
		if t.Congestion != "" {
			if err := unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, t.Congestion); err != nil {
				serr = fmt.Errorf("TCP congestion control %q: %w (this host offers: %s)", t.Congestion, err, availableCongestion())
				return
			}
		}
		if budget > 0 {
			serr = setPacing(fd, budget)
		}
	})
	if err := errors.Join(cerr, serr); err != nil {
		return nil, fmt.Errorf("%w: %w", errTuning, err)
	}
	if budget <= 0 {
		return nil, nil
	}
	p := &Pacer{raw: raw}
	if t.Pacing == PacingYield {
		p.stop, p.done = make(chan struct{}), make(chan struct{})
		go func() { defer close(p.done); yield(raw, budget, p.stop) }()
	}
	return p, nil
}

// Pacer is a paced socket's pacing, as Apply set it: Lift takes it off
// for the switchover's pause. QEMU lifts its own rate limit for the
// stop-and-copy (migration_completion sets it to INT64_MAX); every byte
// still to go then is paused time, and a socket paced at the budget (or
// lower, yielding to a queue the VM's clients no longer add to) stretches
// the pause: 222 ms unpaced against 309 ms paced in the standard run
// (bench/results/2026-11-30-standard).
type Pacer struct {
	raw  syscall.RawConn
	stop chan struct{} // closed by Lift: the yield goroutine ends
	done chan struct{} // closed when the yield goroutine ended
	once sync.Once
	err  error
}

// Lift stops the yielding goroutine (waiting until it has, so it cannot
// set a rate afterwards) and sets the socket's SO_MAX_PACING_RATE to
// unlimited (~0). Only the first call acts; later ones return its error.
// A nil Pacer (an unpaced socket) lifts nothing. The error is the
// kernel's refusal (the socket closed, say): the stream then stays paced,
// which slows the pause but breaks nothing.
func (p *Pacer) Lift() error {
	if p == nil {
		return nil
	}
	p.once.Do(func() {
		if p.stop != nil {
			close(p.stop)
			<-p.done
		}
		var serr error
		if err := p.raw.Control(func(fd uintptr) {
			// ~0U is the kernel's "unlimited" (the value an unpaced socket reads back).
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, -1); err != nil {
				serr = fmt.Errorf("SO_MAX_PACING_RATE unlimited: %w", err)
			}
		}); err != nil {
			serr = err
		}
		p.err = serr
	})
	return p.err
}

func setPacing(fd uintptr, bytesPerSecond float64) error {
	if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, int(bytesPerSecond)); err != nil {
		return fmt.Errorf("SO_MAX_PACING_RATE %.0f bytes/s: %w", bytesPerSecond, err)
	}
	return nil
}

// The yielding pacer: a delay-based scavenger (LEDBAT's idea, RFC 6817)
// on top of the kernel's TCP. The queue on the path is the socket's
// smoothed RTT over its minimum RTT; the VM's clients wait in the same
// queue at the uplink.
const (
	yieldEvery  = 100 * time.Millisecond // one adjustment per this, about two WAN round trips
	yieldTarget = 10 * time.Millisecond  // queueing delay the disk stream tolerates
	yieldFloor  = 10                     // never below budget / yieldFloor: the copy goes on
	yieldDown   = 0.8                    // multiplicative decrease over the target
	yieldUp     = 16                     // additive increase by budget / yieldUp below half the target
)

// yieldStep is the pacing rate after one period in which the socket saw
// srtt against its minimum minRTT: over the target, 20% less (not under
// a tenth of the budget); under half of it, a sixteenth of the budget
// more (not over the budget); in between, unchanged.
func yieldStep(rate, budget float64, srtt, minRTT time.Duration) float64 {
	q := srtt - minRTT
	switch {
	case q > yieldTarget:
		return max(rate*yieldDown, budget/yieldFloor)
	case q < yieldTarget/2:
		return min(rate+budget/yieldUp, budget)
	}
	return rate
}

// yield adjusts raw's pacing rate every yieldEvery until the socket is
// closed (or its TCP_INFO cannot be read) or stop is closed.
func yield(raw syscall.RawConn, budget float64, stop <-chan struct{}) {
	cur := budget
	tick := time.NewTicker(yieldEvery)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		var info *unix.TCPInfo
		var ierr error
		if err := raw.Control(func(fd uintptr) {
			info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
			if ierr != nil || info.Min_rtt == 0 {
				return
			}
			next := yieldStep(cur, budget, time.Duration(info.Rtt)*time.Microsecond, time.Duration(info.Min_rtt)*time.Microsecond)
			if next != cur && setPacing(fd, next) == nil {
				cur = next
			}
		}); err != nil || ierr != nil {
			return
		}
	}
}

// availableCongestion is the kernel's list of TCP congestion controls, or
// a note that it could not be read.
func availableCongestion() string {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control")
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return strings.TrimSpace(string(b))
}
