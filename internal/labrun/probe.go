package labrun

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
)

// Probe is a client in the lab's client namespace that keeps one TCP
// connection to the guest's echo service and sends a small request every
// Interval; it records when each answer came back. Where the connection
// breaks (freeze-and-copy), it reconnects to Resolve()'s address, as a
// client following DNS would.
type Probe struct {
	L        *lab.Lab
	Target   netip.AddrPort
	Interval time.Duration
	// Resolve, if set, gives the address to reconnect to after a failure.
	Resolve func(context.Context) (netip.Addr, error)
	// GiveUp, if set, ends a connection that got no answer for this long
	// (a client's own timeout: how it notices a server that went away).
	GiveUp time.Duration
	// Phase delays the first connection (and with it every send after):
	// the load spreads its connections over one Interval this way, as
	// independent clients are, instead of sending in lockstep.
	Phase time.Duration

	mu          sync.Mutex
	sent, got   int
	replies     []time.Time
	reconnects  int
	firstFailAt time.Time
	ports       []uint16 // the client ports of its connections, in order
}

// Run probes until ctx ends.
func (p *Probe) Run(ctx context.Context) {
	target := p.Target
	if p.Phase > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(p.Phase):
		}
	}
	for ctx.Err() == nil {
		c, err := p.L.DialTCP(ctx, lab.Client, target)
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			if p.Resolve != nil {
				if a, err := p.Resolve(ctx); err == nil {
					target = netip.AddrPortFrom(a, target.Port())
				}
			}
			continue
		}
		if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
			p.mu.Lock()
			p.ports = append(p.ports, uint16(a.Port))
			p.mu.Unlock()
		}
		p.session(ctx, c)
		c.Close()
		if ctx.Err() == nil {
			p.mu.Lock()
			p.reconnects++
			p.mu.Unlock()
			// Reconnect where the name points now (it may have moved).
			if p.Resolve != nil {
				if a, err := p.Resolve(ctx); err == nil {
					target = netip.AddrPortFrom(a, target.Port())
				}
			}
		}
	}
}

func (p *Probe) session(ctx context.Context, c net.Conn) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 8)
		for {
			wait := 3 * time.Second
			if p.GiveUp > 0 {
				wait = p.GiveUp
			}
			c.SetReadDeadline(time.Now().Add(wait))
			if _, err := io.ReadFull(c, buf); err != nil {
				var ne net.Error
				if ok := asNetErr(err, &ne); ok && ne.Timeout() && ctx.Err() == nil && p.GiveUp == 0 {
					continue // a long pause is what we measure, not a failure
				}
				c.Close() // unblocks the writer
				return
			}
			p.mu.Lock()
			p.got++
			p.replies = append(p.replies, time.Now())
			p.mu.Unlock()
		}
	}()
	t := time.NewTicker(p.Interval)
	defer t.Stop()
	var seq uint64
	for {
		select {
		case <-ctx.Done():
			// Stop asking; let the answers in flight arrive.
			for i := 0; i < 100; i++ {
				p.mu.Lock()
				all := p.got >= p.sent
				p.mu.Unlock()
				if all {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			c.Close()
			<-done
			return
		case <-done:
			return
		case <-t.C:
		}
		seq++
		b := binary.BigEndian.AppendUint64(nil, seq)
		c.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := c.Write(b); err != nil {
			c.Close()
			<-done
			return
		}
		p.mu.Lock()
		p.sent++
		p.mu.Unlock()
	}
}

func asNetErr(err error, ne *net.Error) bool {
	e, ok := err.(net.Error)
	if ok {
		*ne = e
	}
	return ok
}

// Disruption summarises gaps in a series of arrival times.
type Disruption struct {
	Worst    []Gap         // the longest gaps, longest first (at most 5)
	Total    time.Duration // sum over gaps longer than Threshold of (gap - interval)
	Longest  time.Duration
	Gaps     int // gaps longer than Threshold
	Samples  int
	Interval time.Duration
	// Threshold: shorter gaps are jitter, not disruption.
	Threshold time.Duration
	// Outage is the same sum over gaps longer than OutageThreshold (100 ms):
	// what a person would notice, leaving out latency bumps.
	Outage          time.Duration
	Outages         int
	OutageThreshold time.Duration
}

// Gaps computes the disruption of arrivals expected every interval, between
// the first and the last arrival.
func Gaps(arrivals []time.Time, interval time.Duration) Disruption {
	return GapsIn(arrivals, interval, time.Time{}, time.Time{})
}

// GapsIn computes the disruption of arrivals expected every interval from
// start to end: the stretch before the first arrival and after the last
// (a service that stopped answering) count as gaps too; no arrival at all
// is one gap over the whole window. A zero start or end leaves that side
// open.
func GapsIn(arrivals []time.Time, interval time.Duration, start, end time.Time) Disruption {
	d := Disruption{Samples: len(arrivals), Interval: interval, Threshold: 3 * interval, OutageThreshold: 100 * time.Millisecond}
	pts := Bounded(arrivals, start, end)
	var all []Gap
	for i := 1; i < len(pts); i++ {
		g := pts[i].Sub(pts[i-1])
		d.Longest = max(d.Longest, g)
		if g > d.Threshold {
			d.Gaps++
			d.Total += g - interval
			all = append(all, Gap{Start: pts[i-1], Length: g})
		}
		if g > d.OutageThreshold {
			d.Outages++
			d.Outage += g - interval
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Length > all[j].Length })
	d.Worst = all[:min(5, len(all))]
	return d
}

// Bounded is arrivals sorted (in place), with start before them and end
// after them where those are set and lie outside: the points between
// which GapsIn measures gaps.
func Bounded(arrivals []time.Time, start, end time.Time) []time.Time {
	sort.Slice(arrivals, func(i, j int) bool { return arrivals[i].Before(arrivals[j]) })
	pts := arrivals
	if !start.IsZero() && (len(pts) == 0 || start.Before(pts[0])) {
		pts = append([]time.Time{start}, pts...)
	}
	if !end.IsZero() && (len(pts) == 0 || end.After(pts[len(pts)-1])) {
		pts = append(pts, end)
	}
	return pts
}

// Result returns the probe's counts and its disruption.
func (p *Probe) Result() (sent, got, reconnects int, d Disruption) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent, p.got, p.reconnects, Gaps(append([]time.Time(nil), p.replies...), p.Interval)
}

// Gap is a stretch without arrivals.
type Gap struct {
	Start  time.Time
	Length time.Duration
}

// state returns the probe's counts, a copy of its reply times and its
// connections' client ports.
func (p *Probe) state() (sent, got, reconnects int, replies []time.Time, ports []uint16) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent, p.got, p.reconnects, append([]time.Time(nil), p.replies...), append([]uint16(nil), p.ports...)
}

// LastReply is when the last answer arrived (zero if none yet).
func (p *Probe) LastReply() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.replies) == 0 {
		return time.Time{}
	}
	return p.replies[len(p.replies)-1]
}
