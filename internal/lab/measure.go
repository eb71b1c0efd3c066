package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"time"

	"github.com/vmhop/vmhop/internal/netns"
)

// Addr returns host's own address.
func Addr(host string) netip.Addr {
	for _, a := range accesses {
		if a.host == host {
			return a.hostIP.Addr()
		}
	}
	panic("lab: no address for host " + host)
}

// MeasureRTT sends n small UDP probes from host from to an echo responder on
// host to and returns the median round-trip time.
func (l *Lab) MeasureRTT(ctx context.Context, from, to string, n int) (time.Duration, error) {
	pc, err := netns.ListenPacket(l.NS(to), "udp", ":9007")
	if err != nil {
		return 0, err
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			k, a, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:k], a)
		}
	}()
	c, err := l.Dialer(from)(ctx, "udp", netip.AddrPortFrom(Addr(to), 9007).String())
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var rtts []time.Duration
	buf := make([]byte, 64)
	for i := 0; i < n+2 && ctx.Err() == nil; i++ {
		start := time.Now()
		c.SetDeadline(start.Add(time.Second))
		if _, err := c.Write([]byte{byte(i)}); err != nil {
			return 0, err
		}
		k, err := c.Read(buf)
		if err != nil || k != 1 || buf[0] != byte(i) {
			continue // lost probe (or ARP warm-up): not an RTT sample
		}
		if i >= 2 { // the first probes pay for ARP resolution
			rtts = append(rtts, time.Since(start))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(rtts) < n/2 {
		return 0, fmt.Errorf("rtt %s->%s: only %d of %d probes answered", from, to, len(rtts), n)
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	return rtts[len(rtts)/2], nil
}

// MeasureThroughput sends TCP bulk data from host from to host to for d and
// returns goodput in bits per second over the part after warm-up (the first
// quarter, where slow start runs, is left out).
func (l *Lab) MeasureThroughput(ctx context.Context, from, to string, d time.Duration) (float64, error) {
	ln, err := netns.Listen(l.NS(to), "tcp", ":9008")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	type mark struct {
		t time.Time
		n int64
	}
	marks := make(chan []mark, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			marks <- nil
			return
		}
		defer c.Close()
		var ms []mark
		var total int64
		buf := make([]byte, 256<<10)
		for {
			k, err := c.Read(buf)
			total += int64(k)
			ms = append(ms, mark{time.Now(), total})
			if err != nil {
				break
			}
		}
		marks <- ms
	}()
	c, err := l.DialTCP(ctx, from, netip.AddrPortFrom(Addr(to), 9008))
	if err != nil {
		return 0, err
	}
	buf := make([]byte, 256<<10)
	end := time.Now().Add(d)
	for time.Now().Before(end) && ctx.Err() == nil {
		c.SetWriteDeadline(end)
		if _, err := c.Write(buf); err != nil && !errors.Is(err, io.EOF) && !isTimeout(err) {
			c.Close()
			return 0, err
		}
	}
	c.Close()
	ms := <-marks
	if len(ms) < 2 {
		return 0, errors.New("throughput: receiver saw no data")
	}
	start := ms[0].t.Add(d / 4)
	var a *mark
	for i := range ms {
		if a == nil && ms[i].t.After(start) {
			a = &ms[i]
		}
	}
	b := ms[len(ms)-1]
	if a == nil || !b.t.After(a.t) {
		return 0, errors.New("throughput: too short to measure")
	}
	return float64(b.n-a.n) * 8 / b.t.Sub(a.t).Seconds(), nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
