package labrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sort"
	"sync"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/netns"
)

// Load is the client side of a lab migration: what an ordinary busy client
// population does to a service while it moves. From the lab's client
// namespace it keeps Conns persistent TCP connections to the echo port at
// Addr, each sending a line every EchoEvery; opens a new HTTP connection
// every HTTPEvery to Name, resolved through DNS each time (so new clients
// follow the flip); and sends an ICMP echo to Addr every PingEvery.
type Load struct {
	L         *lab.Lab
	Addr      netip.Addr     // the VM's address when the load starts (old_ip)
	Name      string         // DNS name of the service ("svc.example.")
	DNS       netip.AddrPort // the server new connections resolve Name with
	Conns     int            // persistent echo connections; default 4 (at least 1)
	EchoEvery time.Duration  // default 10 ms
	HTTPEvery time.Duration  // default 50 ms; negative disables
	PingEvery time.Duration  // default 10 ms; negative disables
	// GiveUp, if set, is a client's patience: an echo connection (or the
	// bulk download) that gets nothing back for this long is closed and
	// made anew to Name's address, resolved again (as a client whose
	// server went away would). 0: echo connections wait forever. An echo
	// connection waits at least 3 of its intervals (patience).
	GiveUp time.Duration
	// BulkRate, if not 0, keeps one bulk TCP download in flight across the
	// move: GET /download from Name's address (resolved through DNS), paced
	// by the guest at BulkRate bytes/s (negative: as fast as TCP goes),
	// read until the load ends; remade by name when it breaks.
	BulkRate int64

	Echo []*Probe

	mu       sync.Mutex
	http     []HTTPAttempt
	pingSent map[uint16]time.Time
	pingGot  []time.Time
	pingErr  string // why the pings did not run, if they did not
	bulk     BulkView
	start    time.Time
	end      time.Time
}

// HTTPAttempt is one new connection by name.
type HTTPAttempt struct {
	At   time.Time
	Addr netip.Addr // what DNS gave (invalid if resolution failed)
	Took time.Duration
	Err  string `json:",omitempty"`
}

func (ld *Load) defaults() {
	if ld.Conns == 0 {
		ld.Conns = 4
	}
	if ld.EchoEvery == 0 {
		ld.EchoEvery = 10 * time.Millisecond
	}
	if ld.HTTPEvery == 0 {
		ld.HTTPEvery = 50 * time.Millisecond
	}
	if ld.PingEvery == 0 {
		ld.PingEvery = 10 * time.Millisecond
	}
}

// EchoPort is the guest's echo service; the capture follows it.
const EchoPort = 7

// Run drives the load until ctx ends; it returns once every request in
// flight has had its chance to come back.
func (ld *Load) Run(ctx context.Context) {
	ld.defaults()
	var probes []*Probe
	for i := range ld.Conns {
		p := &Probe{L: ld.L, Target: netip.AddrPortFrom(ld.Addr, EchoPort), Interval: ld.EchoEvery, Phase: echoPhase(i, ld.Conns, ld.EchoEvery)}
		if ld.GiveUp > 0 {
			p.GiveUp, p.Resolve = patience(ld.GiveUp, ld.EchoEvery), ld.resolve
		}
		probes = append(probes, p)
	}
	ld.mu.Lock()
	ld.start = time.Now()
	ld.pingSent = map[uint16]time.Time{}
	ld.Echo = probes
	ld.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range probes {
		wg.Go(func() { p.Run(ctx) })
	}
	if ld.HTTPEvery > 0 {
		wg.Go(func() { ld.runHTTP(ctx) })
	}
	if ld.PingEvery > 0 {
		wg.Go(func() { ld.runPing(ctx) })
	}
	if ld.BulkRate != 0 {
		wg.Go(func() { ld.runBulk(ctx) })
	}
	// The load ends when it stops asking: answers still in flight may
	// arrive after, but waiting for them is not an outage.
	<-ctx.Done()
	ld.mu.Lock()
	ld.end = time.Now()
	ld.mu.Unlock()
	wg.Wait()
}

// patience is how long an echo connection sending every interval waits
// for an answer before it gives up: giveUp, but at least 3 intervals,
// the gap the disruption count starts at (Disruption.Threshold). A client
// asking once a second that hung up after 2 s would hang up on one late
// answer, and its reconnection (a DNS lookup, a handshake, a new
// connection for the server to hold) loads the server more than the
// answer it missed: 1000 connections at 1 Hz with 2 s of patience
// reconnected 4444 times in one minute (bench/results, 2026-11-30).
func patience(giveUp, interval time.Duration) time.Duration {
	return max(giveUp, 3*interval)
}

// echoPhase is echo connection i's delay of n: the connections open
// spread evenly over one interval, every's i/n-th, or at EchoOpenRate
// when that takes longer; so they send spread over the interval too, as
// independent clients do. In step, 1000 connections at 1 Hz opened at
// once and sent 1000 segments in one burst every second.
func echoPhase(i, n int, every time.Duration) time.Duration {
	if n <= 1 {
		return 0
	}
	return time.Duration(int64(echoRamp(n, every)) * int64(i) / int64(n))
}

// EchoOpenRate is how many echo connections a load opens per second at
// most: clients that arrive over time, not a connection storm (the lab
// guest's one emulated vCPU accepted some 100 a second when 1000 came at
// once, and every one not answered in 2 s was dialled again).
const EchoOpenRate = 100

// echoRamp is how long n echo connections sending every interval take
// to open: one interval, or n at EchoOpenRate when longer.
func echoRamp(n int, every time.Duration) time.Duration {
	return max(every, time.Duration(n)*time.Second/EchoOpenRate)
}

// WaitEcho waits until every echo connection has had an answer, at most
// the connections' ramp (echoRamp) and then timeout, and says how many
// have: a move starts on a load that is up.
// Call it once Run runs; the load's fields are not to change meanwhile.
func (ld *Load) WaitEcho(ctx context.Context, timeout time.Duration) (up, of int) {
	ld.defaults()
	deadline := time.Now().Add(echoRamp(ld.Conns, ld.EchoEvery) + timeout)
	for {
		ld.mu.Lock()
		probes := ld.Echo
		ld.mu.Unlock()
		up = 0
		for _, p := range probes {
			if !p.LastReply().IsZero() {
				up++
			}
		}
		if (len(probes) > 0 && up == len(probes)) || time.Now().After(deadline) || ctx.Err() != nil {
			return up, ld.Conns
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (ld *Load) resolver() *net.Resolver {
	dial := ld.L.Dialer(lab.Client)
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dial(ctx, network, ld.DNS.String())
	}}
}

// resolve is Name's first IPv4 address, asked of DNS from the client.
func (ld *Load) resolve(ctx context.Context) (netip.Addr, error) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	addrs, err := ld.resolver().LookupNetIP(rctx, "ip4", ld.Name)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("resolve: %w", err)
	}
	if len(addrs) == 0 {
		return netip.Addr{}, errors.New("resolve: no address")
	}
	return addrs[0], nil
}

// BulkView is the bulk download: bytes received and its connections.
type BulkView struct {
	Bytes      int64
	Reconnects int        // connections remade after one broke or went silent
	Conns      []BulkConn // in order
}

// BulkConn is one connection of the bulk download.
type BulkConn struct {
	Port  uint16     // the client's port (to find it in the capture)
	Addr  netip.Addr // the address DNS gave
	Bytes int64
	Err   string `json:",omitempty"` // why it ended, if not with the load
}

// runBulk keeps one download in flight until ctx ends.
func (ld *Load) runBulk(ctx context.Context) {
	patience := ld.GiveUp
	if patience == 0 {
		patience = 3 * time.Second
	}
	rate := max(ld.BulkRate, 0)
	for ctx.Err() == nil {
		addr, err := ld.resolve(ctx)
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		c, err := ld.L.DialTCP(ctx, lab.Client, netip.AddrPortFrom(addr, 80))
		if err != nil {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		bc := BulkConn{Addr: addr}
		if a, ok := c.LocalAddr().(*net.TCPAddr); ok {
			bc.Port = uint16(a.Port)
		}
		stop := context.AfterFunc(ctx, func() { c.Close() })
		_, err = fmt.Fprintf(c, "GET /download?rate=%d HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", rate, addr)
		buf := make([]byte, 64<<10)
		for err == nil {
			c.SetReadDeadline(time.Now().Add(patience))
			var n int
			n, err = c.Read(buf)
			bc.Bytes += int64(n)
			ld.mu.Lock()
			ld.bulk.Bytes += int64(n)
			ld.mu.Unlock()
		}
		stop()
		c.Close()
		if ctx.Err() == nil {
			bc.Err = err.Error()
		}
		ld.mu.Lock()
		ld.bulk.Conns = append(ld.bulk.Conns, bc)
		if ctx.Err() == nil {
			ld.bulk.Reconnects++
		}
		ld.mu.Unlock()
	}
}

func (ld *Load) runHTTP(ctx context.Context) {
	res := ld.resolver()
	client := ld.L.HTTPClient(lab.Client)
	client.Timeout = 3 * time.Second // a client's patience; a failure counts
	t := time.NewTicker(ld.HTTPEvery)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		wg.Go(func() {
			a := HTTPAttempt{At: time.Now()}
			err := func() error {
				rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				addrs, err := res.LookupNetIP(rctx, "ip4", ld.Name)
				if err != nil {
					return fmt.Errorf("resolve: %w", err)
				}
				if len(addrs) == 0 {
					return errors.New("resolve: no address")
				}
				a.Addr = addrs[0]
				resp, err := client.Get("http://" + a.Addr.String() + "/")
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				if _, err := io.Copy(io.Discard, resp.Body); err != nil {
					return err
				}
				if resp.StatusCode != http.StatusOK {
					return fmt.Errorf("http status %d", resp.StatusCode)
				}
				return nil
			}()
			a.Took = time.Since(a.At)
			if err != nil {
				a.Err = err.Error()
			}
			ld.mu.Lock()
			ld.http = append(ld.http, a)
			ld.mu.Unlock()
		})
	}
}

func (ld *Load) runPing(ctx context.Context) {
	pc, err := netns.ListenPacket(ld.L.NS(lab.Client), "ip4:icmp", "0.0.0.0")
	if err != nil {
		ld.mu.Lock()
		ld.pingErr = fmt.Sprintf("icmp socket: %v", err)
		ld.mu.Unlock()
		return
	}
	c := pc
	id := os.Getpid() & 0xffff
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			m, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || m.Type != ipv4.ICMPTypeEchoReply {
				continue
			}
			e, ok := m.Body.(*icmp.Echo)
			if !ok || e.ID != id || from.String() != ld.Addr.String() {
				continue
			}
			ld.mu.Lock()
			if _, sent := ld.pingSent[uint16(e.Seq)]; sent {
				ld.pingGot = append(ld.pingGot, time.Now())
				delete(ld.pingSent, uint16(e.Seq))
			}
			ld.mu.Unlock()
		}
	}()
	t := time.NewTicker(ld.PingEvery)
	defer t.Stop()
	dst := &net.IPAddr{IP: ld.Addr.AsSlice()}
	for seq := 1; ; seq++ {
		select {
		case <-ctx.Done():
			time.Sleep(time.Second) // replies in flight
			c.Close()
			<-done
			return
		case <-t.C:
		}
		b, _ := (&icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq & 0xffff, Data: []byte("vmhop")}}).Marshal(nil)
		ld.mu.Lock()
		ld.pingSent[uint16(seq)] = time.Now()
		ld.mu.Unlock()
		c.WriteTo(b, dst)
	}
}

// ClientView is everything the load saw, each outage counted.
type ClientView struct {
	Start, End time.Time
	Echo       []EchoView
	HTTP       HTTPView
	Ping       PingView
	Bulk       BulkView // the bulk download (Load.BulkRate), if any
}

// EchoView is one persistent connection.
type EchoView struct {
	Sent, Got  int
	Unanswered int // sent and never echoed
	Reconnects int // the connection broke (reset, timeout) and was made anew
	Disruption Disruption
	Ports      []uint16 // its connections' client ports, in order (to find them in the capture)
}

// HTTPView counts the new connections by name.
type HTTPView struct {
	Attempts, OK, Failed int
	// FailWindow runs from the start of the first failed attempt to the end
	// of the last one to fail; 0 if none.
	FailWindow time.Duration
	// Longest is the longest stretch of consecutive failed attempts, from
	// the first failure's start to the next success's start.
	Longest time.Duration
	// NewAddrAt is when the first attempt reached an address other than the
	// load's starting one (after DNS flipped), since Start; 0 if never.
	NewAddrAt time.Duration
	ByAddr    map[string]int
	Errors    []string `json:",omitempty"` // the first few, for the reader
}

// PingView counts ICMP echoes.
type PingView struct {
	Sent, Answered, Lost int
	Disruption           Disruption
	Err                  string `json:",omitempty"` // the pings could not run
}

// View computes what the load saw; echo gaps come from arrivals captured on
// the client's interface (per client port) when given, else from the probes'
// own sockets. Gaps run to the end of the load: a service that stopped
// answering is a trailing outage.
func (ld *Load) View(captured map[uint16][]time.Time) ClientView {
	ld.mu.Lock()
	defer ld.mu.Unlock()
	v := ClientView{Start: ld.start, End: ld.end}
	for _, p := range ld.Echo {
		sent, got, rec, arrivals, ports := p.state()
		if captured != nil {
			arrivals = nil
			for _, port := range ports {
				arrivals = append(arrivals, captured[port]...)
			}
		}
		v.Echo = append(v.Echo, EchoView{Sent: sent, Got: got, Unanswered: sent - got, Reconnects: rec,
			Disruption: GapsIn(arrivals, p.Interval, ld.from(arrivals), ld.end), Ports: ports})
	}
	v.HTTP = httpView(ld.http, ld.Addr, ld.start)
	v.Bulk = ld.bulk
	v.Bulk.Conns = append([]BulkConn(nil), ld.bulk.Conns...)
	v.Ping = PingView{Sent: len(ld.pingGot) + len(ld.pingSent), Answered: len(ld.pingGot), Lost: len(ld.pingSent), Err: ld.pingErr}
	if ld.PingEvery > 0 {
		v.Ping.Disruption = GapsIn(append([]time.Time(nil), ld.pingGot...), ld.PingEvery, ld.from(ld.pingGot), ld.end)
	}
	return v
}

// from is where a stream's gaps start: at its first arrival (connection
// set-up is not disruption), or at the load's start if nothing arrived.
func (ld *Load) from(arrivals []time.Time) time.Time {
	if len(arrivals) == 0 {
		return ld.start
	}
	return time.Time{}
}

func httpView(attempts []HTTPAttempt, start netip.Addr, t0 time.Time) HTTPView {
	a := append([]HTTPAttempt(nil), attempts...)
	sort.Slice(a, func(i, j int) bool { return a[i].At.Before(a[j].At) })
	v := HTTPView{Attempts: len(a), ByAddr: map[string]int{}}
	var firstFail, lastFail, streak time.Time
	for _, x := range a {
		if x.Addr.IsValid() {
			v.ByAddr[x.Addr.String()]++
		}
		if x.Err == "" && x.Addr.IsValid() && x.Addr != start && v.NewAddrAt == 0 {
			v.NewAddrAt = x.At.Sub(t0)
		}
		if x.Err != "" {
			v.Failed++
			if firstFail.IsZero() {
				firstFail = x.At
			}
			if end := x.At.Add(x.Took); end.After(lastFail) {
				lastFail = end
			}
			if streak.IsZero() {
				streak = x.At
			}
			if len(v.Errors) < 5 {
				v.Errors = append(v.Errors, x.At.Sub(t0).Round(time.Millisecond).String()+": "+x.Err)
			}
			continue
		}
		v.OK++
		if !streak.IsZero() {
			v.Longest = max(v.Longest, x.At.Sub(streak))
			streak = time.Time{}
		}
	}
	if !streak.IsZero() { // failing until the end
		v.Longest = max(v.Longest, lastFail.Sub(streak))
	}
	if !firstFail.IsZero() {
		v.FailWindow = lastFail.Sub(firstFail)
	}
	return v
}
