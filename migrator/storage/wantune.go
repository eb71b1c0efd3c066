package storage

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// WANTuning is how a disk stream's WAN socket yields to the VM's own
// traffic on the source's uplink (the spec's limits.disk_pacing and
// limits.disk_congestion).
type WANTuning struct {
	// Pacing has the kernel pace the socket at the stream's budget
	// (SO_MAX_PACING_RATE: TCP's internal pacing, Linux >= 4.13, no fq
	// needed): segments leave evenly spaced instead of in cwnd-sized
	// bursts at line rate, which fill the uplink's queue in front of the
	// VM's packets even when the average is under the budget.
	Pacing bool
	// Congestion is the socket's TCP congestion control ("bbr", "cubic",
	// ...); "" keeps the host's default.
	Congestion string
}

// errTuning wraps a socket option the host refused (no redial mends it).
var errTuning = errors.New("disk stream socket")

// pacingHeadroom is the pacing rate over the budget: the token bucket in
// front (paced) counts NBD bytes, the kernel paces TLS records (~0.1% more).
// The bucket stays what holds the average; pacing only spreads its bursts.
const pacingHeadroom = 1.02

// apply sets t on c (a *net.TCPConn; anything else is left alone, as a
// test's pipe is) with the rate of limit in bytes per second (nil or
// unlimited: no pacing). An unknown congestion control is an error naming
// what the host offers.
func (t WANTuning) apply(c net.Conn, limit *rate.Limiter) error {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	cerr := raw.Control(func(fd uintptr) {
		if t.Congestion != "" {
			if err := unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, t.Congestion); err != nil {
				serr = fmt.Errorf("TCP congestion control %q: %w (this host offers: %s)", t.Congestion, err, availableCongestion())
				return
			}
		}
		if t.Pacing && limit != nil && limit.Limit() != rate.Inf && limit.Limit() > 0 {
			bps := float64(limit.Limit()) * pacingHeadroom
			if bps >= float64(^uint32(0)) {
				return // above what SO_MAX_PACING_RATE takes (~34 Gbit/s): no pacing needed
			}
			if err := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE, int(bps)); err != nil {
				serr = fmt.Errorf("SO_MAX_PACING_RATE %.0f bytes/s: %w", bps, err)
			}
		}
	})
	if err := errors.Join(cerr, serr); err != nil {
		return fmt.Errorf("%w: %w", errTuning, err)
	}
	return nil
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
