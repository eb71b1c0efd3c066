package storage

import (
	"errors"
	"net"
	"strings"
	"testing"

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
	if err := (WANTuning{Pacing: true, Congestion: "reno"}).apply(c, limit); err != nil {
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
		{"pacing off", WANTuning{}, rate.NewLimiter(1e6, 1<<16)},
		{"no limiter", WANTuning{Pacing: true}, nil},
		{"unlimited", WANTuning{Pacing: true}, rate.NewLimiter(rate.Inf, 0)},
	} {
		c := loopbackConn(t)
		before, _ := sockopts(t, c)
		if err := tc.t.apply(c, tc.limit); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		cc, pacing := sockopts(t, c)
		if cc != before || pacing != -1 && uint32(pacing) != ^uint32(0) {
			t.Fatalf("%s: congestion %q (was %q), pacing %d; want unchanged, unpaced", tc.name, cc, before, pacing)
		}
	}
}

// TestWANTuningUnknownCongestion: a name the kernel does not have is an
// error that names what the host offers, and a chunked round treats it as
// final (no redial mends it).
func TestWANTuningUnknownCongestion(t *testing.T) {
	err := (WANTuning{Congestion: "nosuchcc"}).apply(loopbackConn(t), nil)
	if err == nil || !errors.Is(err, errTuning) || !strings.Contains(err.Error(), "this host offers") {
		t.Fatalf("err = %v", err)
	}
	if !refused(err) {
		t.Fatal("a refused socket option is retried")
	}
}
