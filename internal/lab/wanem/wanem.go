// Package wanem emulates a WAN link in userspace: it bridges two interfaces
// through AF_PACKET sockets and holds each frame for a one-way delay after
// serializing it at a rate, dropping some at random and at a full queue.
//
// The kernels vmhop is tested on have no netem and no fq, so this is the lab's
// only source of delay. The interfaces it bridges need GSO/TSO/GRO off (frames
// must stay within the MTU) and their peers need tx checksum offload off
// (frames read here must carry finished checksums).
package wanem

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/units"
)

// Profile is one direction of an emulated link.
type Profile struct {
	Delay time.Duration  // one-way propagation delay
	Rate  units.Bitrate  // serialization rate of Ethernet frames; 0 is unlimited
	Loss  float64        // probability in [0,1) that a frame is dropped
	Queue units.ByteSize // bytes waiting for the wire before tail drop; 0 is 50 ms at Rate
}

func (p Profile) queueLimit() time.Duration {
	if p.Rate == 0 {
		return 0
	}
	q := p.Queue
	if q == 0 {
		q = units.ByteSize(p.Rate.BytesPerSecond() / 20) // 50 ms
		if q < 64*units.KiB {
			q = 64 * units.KiB
		}
	}
	return txTime(int(q), p.Rate)
}

func txTime(n int, r units.Bitrate) time.Duration {
	return time.Duration(uint64(n) * 8 * uint64(time.Second) / uint64(r))
}

// shaper decides, for each frame offered to one direction, whether it is sent
// and when it arrives. It is the whole emulation model; the rest is plumbing.
type shaper struct {
	p         Profile
	limit     time.Duration // queue limit expressed as waiting time at Rate
	busyUntil time.Time     // when the wire finishes serializing what is queued
	rnd       func() float64
}

func newShaper(p Profile) *shaper {
	return &shaper{p: p, limit: p.queueLimit(), rnd: rand.Float64}
}

// Verdicts of admit.
const (
	sent = iota
	lost
	queueFull
)

// admit returns when an n-byte frame offered at now is delivered, or why not.
func (s *shaper) admit(now time.Time, n int) (time.Time, int) {
	if s.p.Loss > 0 && s.rnd() < s.p.Loss {
		return time.Time{}, lost
	}
	if s.p.Rate == 0 {
		return now.Add(s.p.Delay), sent
	}
	start := now
	if s.busyUntil.After(now) {
		if s.busyUntil.Sub(now) > s.limit {
			return time.Time{}, queueFull
		}
		start = s.busyUntil
	}
	s.busyUntil = start.Add(txTime(n, s.p.Rate))
	return s.busyUntil.Add(s.p.Delay), sent
}

// Stats counts one direction's frames.
type Stats struct {
	Sent, Lost, QueueDrops, WriteErrors atomic.Uint64
}

// Link bridges interfaces A and B of the current network namespace.
type Link struct {
	A, B    string
	AtoB    Profile
	BtoA    Profile
	StatsAB Stats
	StatsBA Stats
	fa, fb  *os.File
}

// Open opens the packet sockets of a link; frames queue in them until Run.
func Open(a, b string, atob, btoa Profile) (*Link, error) {
	fa, err := openPacket(a)
	if err != nil {
		return nil, err
	}
	fb, err := openPacket(b)
	if err != nil {
		fa.Close()
		return nil, err
	}
	return &Link{A: a, B: b, AtoB: atob, BtoA: btoa, fa: fa, fb: fb}, nil
}

// Run forwards frames both ways until ctx is done, then closes the sockets.
func (l *Link) Run(ctx context.Context) error {
	defer l.fa.Close()
	defer l.fb.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 2)
	for _, d := range []struct {
		in, out *os.File
		p       Profile
		st      *Stats
	}{{l.fa, l.fb, l.AtoB, &l.StatsAB}, {l.fb, l.fa, l.BtoA, &l.StatsBA}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- forward(ctx, d.in, d.out, newShaper(d.p), d.st)
			cancel()
		}()
	}
	<-ctx.Done()
	// Unblock readers; the poller wakes them with os.ErrDeadlineExceeded.
	l.fa.SetReadDeadline(time.Now())
	l.fb.SetReadDeadline(time.Now())
	wg.Wait()
	for range 2 {
		if err := <-errc; err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	return nil
}

// String summarizes the counters.
func (l *Link) String() string {
	f := func(s *Stats) string {
		return fmt.Sprintf("sent %d lost %d queue-drops %d write-errors %d",
			s.Sent.Load(), s.Lost.Load(), s.QueueDrops.Load(), s.WriteErrors.Load())
	}
	return fmt.Sprintf("%s->%s: %s; %s->%s: %s", l.A, l.B, f(&l.StatsAB), l.B, l.A, f(&l.StatsBA))
}

type frame struct {
	b   []byte
	due time.Time
}

// forward reads frames from in and writes them to out when due. Due times are
// monotonic (constant delay after a FIFO wire), so a FIFO channel is the queue.
func forward(ctx context.Context, in, out *os.File, s *shaper, st *Stats) error {
	q := make(chan frame, 65536)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for f := range q {
			if d := time.Until(f.due); d > 0 {
				time.Sleep(d)
			}
			if _, err := out.Write(f.b); err != nil {
				st.WriteErrors.Add(1) // e.g. ENOBUFS, or the peer went down: a lost frame
				continue
			}
			st.Sent.Add(1)
		}
	}()
	defer func() { close(q); <-done }()
	buf := make([]byte, 65536)
	for {
		n, err := in.Read(buf)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, unix.ENETDOWN) || errors.Is(err, unix.EAGAIN) {
				continue
			}
			return fmt.Errorf("read %s: %w", in.Name(), err)
		}
		due, v := s.admit(time.Now(), n)
		switch v {
		case lost:
			st.Lost.Add(1)
			continue
		case queueFull:
			st.QueueDrops.Add(1)
			continue
		}
		select {
		case q <- frame{b: append([]byte(nil), buf[:n]...), due: due}:
		default:
			st.QueueDrops.Add(1)
		}
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// openPacket opens a promiscuous AF_PACKET socket on ifname that sees only
// frames arriving on it (not the ones it sends) and is non-blocking, so the Go
// poller can wake its reader on shutdown.
func openPacket(ifname string) (*os.File, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("lookup interface %q: %w", ifname, err)
	}
	// Protocol 0 until bound: no frame from another interface is queued meanwhile.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("packet socket on %q: %w", ifname, err)
	}
	fail := func(what string, err error) (*os.File, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("packet socket on %q: %s: %w", ifname, what, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1); err != nil {
		return fail("ignore outgoing", err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 8<<20)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		return fail("bind", err)
	}
	mreq := unix.PacketMreq{Ifindex: int32(ifi.Index), Type: unix.PACKET_MR_PROMISC}
	if err := unix.SetsockoptPacketMreq(fd, unix.SOL_PACKET, unix.PACKET_ADD_MEMBERSHIP, &mreq); err != nil {
		return fail("promiscuous", err)
	}
	return os.NewFile(uintptr(fd), ifname), nil
}
