package storage

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// loopbackConn is one end of a TCP connection on 127.0.0.1.
func loopbackConn(t *testing.T) *net.TCPConn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		if c, err := ln.Accept(); err == nil {
			t.Cleanup(func() { c.Close() })
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func sockopts(t *testing.T, c *net.TCPConn) (cc string, pacing int) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) {
		cc, _ = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
		pacing, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE)
	})
	return strings.TrimRight(cc, "\x00"), pacing
}

// TestWANTuningSetsSocket: pacing at the limiter's rate (with the TLS
// headroom) and the congestion control asked for land on the socket.
func TestWANTuningSetsSocket(t *testing.T) {
	if !strings.Contains(availableCongestion(), "reno") {
		t.Skip("no reno on this host:", availableCongestion())
	}
	c := loopbackConn(t)
	limit := rate.NewLimiter(rate.Limit(11_250_000), 256<<10) // 90 Mbit/s
	if _, err := (WANTuning{Pacing: PacingBudget, Congestion: "reno"}).apply(c, limit); err != nil {
		t.Fatal(err)
	}
	cc, pacing := sockopts(t, c)
	if cc != "reno" || pacing != 11_475_000 {
		t.Fatalf("congestion %q pacing %d bytes/s; want reno, 11475000", cc, pacing)
	}
}

// TestWANTuningOff: no pacing without a limit or with Pacing off, and the
// host's congestion control kept when none is named.
func TestWANTuningOff(t *testing.T) {
	for _, tc := range []struct {
		name  string
		t     WANTuning
		limit *rate.Limiter
	}{
		{"pacing unset", WANTuning{}, rate.NewLimiter(1e6, 1<<16)},
		{"pacing off", WANTuning{Pacing: PacingOff}, rate.NewLimiter(1e6, 1<<16)},
		{"no limiter", WANTuning{Pacing: PacingBudget}, nil},
		{"unlimited", WANTuning{Pacing: PacingYield}, rate.NewLimiter(rate.Inf, 0)},
	} {
		c := loopbackConn(t)
		before, _ := sockopts(t, c)
		p, err := tc.t.apply(c, tc.limit)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		cc, pacing := sockopts(t, c)
		if cc != before || !unpaced(pacing) {
			t.Fatalf("%s: congestion %q (was %q), pacing %d; want unchanged, unpaced", tc.name, cc, before, pacing)
		}
		if p != nil || p.Lift() != nil {
			t.Fatalf("%s: a pacer %v for an unpaced socket, or a nil one that fails to lift", tc.name, p)
		}
	}
}

// TestWANTuningUnknownCongestion: a name the kernel does not have is an
// error that names what the host offers, and a chunked round treats it as
// final (no redial mends it).
func TestWANTuningUnknownCongestion(t *testing.T) {
	_, err := (WANTuning{Congestion: "nosuchcc"}).apply(loopbackConn(t), nil)
	if err == nil || !errors.Is(err, errTuning) || !strings.Contains(err.Error(), "this host offers") {
		t.Fatalf("err = %v", err)
	}
	if !refused(err) {
		t.Fatal("a refused socket option is retried")
	}
}

// TestWANTuningYieldStartsAtBudget: the yielding pacer starts at the
// budget; on an idle loopback connection (no queue) it stays there.
func TestWANTuningYieldStartsAtBudget(t *testing.T) {
	c := loopbackConn(t)
	if _, err := (WANTuning{Pacing: PacingYield}).apply(c, rate.NewLimiter(rate.Limit(1_000_000), 1<<16)); err != nil {
		t.Fatal(err)
	}
	if _, pacing := sockopts(t, c); pacing != 1_020_000 {
		t.Fatalf("pacing %d bytes/s, want 1020000", pacing)
	}
	time.Sleep(3 * yieldEvery)
	if _, pacing := sockopts(t, c); pacing != 1_020_000 {
		t.Fatalf("pacing after %s: %d bytes/s, want 1020000", 3*yieldEvery, pacing)
	}
}

// unpaced is SO_MAX_PACING_RATE's "unlimited" (~0U) as getsockopt's int
// reads it back.
func unpaced(pacing int) bool { return pacing == -1 || uint32(pacing) == ^uint32(0) }

// TestPacerLift: a paced socket (budget or yield) reads back its pacing
// rate before Lift and the kernel's unlimited after; the yield goroutine
// has ended when Lift returns and sets no rate afterwards; a second Lift
// is a no-op.
func TestPacerLift(t *testing.T) {
	for _, pacing := range []string{PacingBudget, PacingYield} {
		c := loopbackConn(t)
		p, err := (WANTuning{Pacing: pacing}).Apply(c, 1_000_000)
		if err != nil {
			t.Fatal(err)
		}
		if p == nil {
			t.Fatalf("%s: no pacer for a paced socket", pacing)
		}
		if _, got := sockopts(t, c); got != 1_020_000 {
			t.Fatalf("%s: pacing %d bytes/s before Lift, want 1020000", pacing, got)
		}
		if err := p.Lift(); err != nil {
			t.Fatalf("%s: %v", pacing, err)
		}
		if _, got := sockopts(t, c); !unpaced(got) {
			t.Fatalf("%s: pacing %d bytes/s after Lift, want unlimited (~0)", pacing, got)
		}
		if pacing == PacingYield {
			select {
			case <-p.done:
			default:
				t.Fatal("yield goroutine still running after Lift")
			}
		}
		time.Sleep(2 * yieldEvery)
		if err := p.Lift(); err != nil {
			t.Fatalf("%s: second Lift: %v", pacing, err)
		}
		if _, got := sockopts(t, c); !unpaced(got) {
			t.Fatalf("%s: pacing %d bytes/s %s after Lift, want unlimited", pacing, got, 2*yieldEvery)
		}
	}
}

// TestPacerYieldEndsWithSocket: the yield goroutine ends once its socket
// is closed, Lift or not (and a Lift after that reports the closed socket).
func TestPacerYieldEndsWithSocket(t *testing.T) {
	c := loopbackConn(t)
	p, err := (WANTuning{Pacing: PacingYield}).Apply(c, 1_000_000)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case <-p.done:
	case <-time.After(5 * yieldEvery):
		t.Fatal("yield goroutine outlives its socket")
	}
	if err := p.Lift(); err == nil {
		t.Fatal("Lift on a closed socket: no error")
	}
}

// TestYieldStep: over the target queueing delay the rate falls by a fifth
// (not under a tenth of the budget); under half the target it climbs by a
// sixteenth of the budget (not over it); in between it holds.
func TestYieldStep(t *testing.T) {
	ms := time.Millisecond
	const budget = 1600.0
	for _, tc := range []struct {
		rate         float64
		srtt, minRTT time.Duration
		want         float64
	}{
		{1600, 40 * ms, 40 * ms, 1600}, // no queue, at the budget: stays
		{1000, 41 * ms, 40 * ms, 1100}, // no queue: a sixteenth more
		{1550, 42 * ms, 40 * ms, 1600}, // ...not over the budget
		{1600, 51 * ms, 40 * ms, 1280}, // 11 ms queue: a fifth less
		{170, 90 * ms, 40 * ms, 160},   // ...not under a tenth of the budget
		{1000, 47 * ms, 40 * ms, 1000}, // 7 ms: between half the target and the target: holds
		{1000, 50 * ms, 40 * ms, 1000}, // exactly the target: holds
	} {
		if got := yieldStep(tc.rate, budget, tc.srtt, tc.minRTT); got != tc.want {
			t.Errorf("rate %.0f, srtt %s, min %s: %.1f, want %.0f", tc.rate, tc.srtt, tc.minRTT, got, tc.want)
		}
	}
}
