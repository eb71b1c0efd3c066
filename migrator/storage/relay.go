package storage

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// Relay carries the disk mirror's NBD connection between the hosts over a
// TLS connection that is set up before QEMU asks for it.
//
// Why: QEMU 7.2 connects an NBD block node synchronously, holding its main
// lock; the guest's network stops until the TCP, TLS and NBD handshakes
// are done — about 13 WAN round trips, half a second on the lab's WAN. With
// the relay, QEMU's connection is local at both ends, and the relay does
// the NBD negotiation with the destination beforehand (Negotiate) and
// answers QEMU's from it (see nbd.go): nothing QEMU waits for at connect
// crosses the WAN.
//
// Both ends hold the same per-migration key and certificate (the way both
// QEMUs would hold a pre-shared key) and accept only that certificate.
//
// A WAN connection with data unacknowledged for Stall (TCP_USER_TIMEOUT)
// is given up; the source QEMU, whose NBD node has a reconnect delay, then
// connects again, the relay dials a new WAN connection for it, QEMU
// resends the requests that were in flight, and the mirror job carries on
// from its own dirty bitmap: what arrived is not sent again.
type Relay struct {
	// DialSource opens the WAN connection at the source host (tests pass
	// namespace-aware ones).
	DialSource func(ctx context.Context, network, addr string) (net.Conn, error)
	// Server is the destination host's end (vmhopd on host B); nil: a
	// LocalDiskServer in this process that listens with ListenDest and
	// dials the NBD server with DialDest.
	Server     DiskServer
	DialDest   func(ctx context.Context, network, addr string) (net.Conn, error)
	ListenDest func(network, addr string) (net.Listener, error)

	DestWAN    string // host:port the destination end listens on
	DestNBD    string // host:port of the destination QEMU's NBD server (local to it)
	SourceSock string // unix socket the source QEMU connects to
	// TLS, if set, is the source end's TLS with its host identity
	// (vmhopd: Daemon.StreamTLS's client side, the destination's
	// certificate checked for its name); the destination end then proves
	// its own (LocalDiskServer.TLS). nil: both ends hold a per-migration
	// Identity made here and sent with ServeRelay.
	TLS *tls.Config
	// Limiter, if set, paces the bytes to the destination (shared with the
	// memory stream's budget by the migrator).
	Limiter *rate.Limiter
	// Tuning is how the WAN socket yields to the VM's own traffic (its
	// pacing is at Limiter's rate).
	Tuning WANTuning
	// Stall bounds how long sent data may stay unacknowledged on a WAN
	// connection before it is given up (default 5s).
	Stall time.Duration

	reconnects atomic.Int32
	peer       *peerTLS
	serving    bool // the destination end is up
	srcLn      net.Listener
	upMu       sync.Mutex // guards preconn, export, prepared (held across WAN I/O)
	preconn    net.Conn   // TLS to the destination end, opened by Start
	export     string     // the NBD export's name (Negotiate)
	prepared   *nbdExport // preconn's negotiation, done by Negotiate; nil: not yet
	known      *nbdExport // the export as last negotiated
	wg         sync.WaitGroup
	mu         sync.Mutex
	conns      []net.Conn
	pacers     []*Pacer // the WAN sockets' pacing (mu)
	unpaced    bool     // LiftPacing was called: new WAN sockets start unpaced (mu)
	tracker    nbdTracker
	toDest     atomic.Int64 // bytes from the source QEMU to the destination
}

// BytesToDest is how many bytes the source sent to the destination
// through the relay (NBD payload and headers, before TLS).
func (r *Relay) BytesToDest() int64 { return r.toDest.Load() }

// Reconnects is how many times the source QEMU's connection was carried
// on a new WAN connection after the previous one broke.
func (r *Relay) Reconnects() int { return int(r.reconnects.Load()) }

func (r *Relay) stall() time.Duration {
	if r.Stall > 0 {
		return r.Stall
	}
	return 5 * time.Second
}

// ResetTracking starts recording which clusters the source writes to the
// destination from now on.
func (r *Relay) ResetTracking() { r.tracker.reset() }

// Written returns the clusters (of TrackGranularity) written through the
// relay since ResetTracking, and false if the stream could not be followed.
func (r *Relay) Written() ([]uint64, bool) { return r.tracker.snapshot() }

// Start listens at both ends and opens the TLS connection in advance.
func (r *Relay) Start(ctx context.Context) error {
	var id Identity
	if r.TLS == nil {
		var err error
		if r.peer, err = newPeerTLS(); err != nil {
			return err
		}
		if id, err = r.peer.identity(); err != nil {
			return err
		}
	}
	if r.Server == nil {
		r.Server = &LocalDiskServer{Listen: r.ListenDest, Dial: r.DialDest}
	}
	if err := r.Server.ServeRelay(ctx, RelayServe{Listen: r.DestWAN, NBD: r.DestNBD, Identity: id, Stall: r.stall()}); err != nil {
		return err
	}
	r.serving = true
	src, err := net.Listen("unix", r.SourceSock)
	if err != nil {
		r.Close()
		return fmt.Errorf("relay: listen %s: %w", r.SourceSock, err)
	}
	r.srcLn = src
	tc, err := r.dialWAN(ctx)
	if err != nil {
		r.Close()
		return err
	}
	r.preconn = tc
	r.track(tc)
	r.wg.Add(1)
	go r.serveSource()
	return nil
}

func (r *Relay) track(c net.Conn) {
	r.mu.Lock()
	r.conns = append(r.conns, c)
	r.mu.Unlock()
}

// dialWAN opens a TLS connection to the destination end.
func (r *Relay) dialWAN(ctx context.Context) (net.Conn, error) {
	raw, err := r.DialSource(ctx, "tcp", r.DestWAN)
	if err != nil {
		return nil, fmt.Errorf("relay: dial %s: %w", r.DestWAN, err)
	}
	giveUpUnacked(raw, r.stall())
	pacer, err := r.Tuning.apply(raw, r.Limiter)
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("relay: %s: %w", r.DestWAN, err)
	}
	r.mu.Lock()
	if r.unpaced {
		pacer.Lift() // a redial inside the pause
	} else if pacer != nil {
		r.pacers = append(r.pacers, pacer)
	}
	r.mu.Unlock()
	cfg := r.TLS
	if cfg == nil {
		cfg = r.peer.client()
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("relay: tls handshake: %w", err)
	}
	return tc, nil
}

// giveUpUnacked makes a TCP connection fail once sent data (or a
// keepalive probe) stays unacknowledged for d, instead of the kernel's
// many minutes: a cut WAN is noticed, and QEMU reconnects.
func giveUpUnacked(c net.Conn, d time.Duration) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: d / 2, Interval: time.Second, Count: 3})
	if raw, err := tc.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
		})
	}
}

// LiftPacing takes the kernel pacing (WANTuning) off the relay's WAN
// sockets, those open and those dialled from now on: the switchover's
// pause calls it (the mirror's last writes are paused time). Limiter
// still counts the bytes. The error is the first socket that refused.
func (r *Relay) LiftPacing() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unpaced = true
	var errs []error
	for _, p := range r.pacers {
		errs = append(errs, p.Lift())
	}
	r.pacers = nil
	return errors.Join(errs...)
}

// Negotiate does the NBD negotiation for export with the destination's
// server over the prepared WAN connection, before the source QEMU
// connects; call it once the export exists.
func (r *Relay) Negotiate(ctx context.Context, export string) error {
	r.upMu.Lock()
	defer r.upMu.Unlock()
	r.export = export
	exp, err := r.negotiate(ctx, r.preconn)
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	r.prepared = exp
	return nil
}

// negotiate asks the destination end to connect its NBD server (one byte),
// then negotiates the export over conn.
func (r *Relay) negotiate(ctx context.Context, conn net.Conn) (*nbdExport, error) {
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	} else {
		conn.SetDeadline(time.Now().Add(r.stall()))
	}
	defer conn.SetDeadline(time.Time{})
	if _, err := conn.Write([]byte{'N'}); err != nil {
		return nil, err
	}
	exp, err := nbdClientHandshake(conn, r.export)
	if err != nil && strings.Contains(err.Error(), destGone) {
		return nil, errDestGone
	}
	if err == nil {
		r.known = exp
	}
	return exp, err
}

// destGone is what the destination end sends instead of the NBD server's
// greeting when that server no longer accepts connections.
const destGone = "VHRELAY-NO-NBD--"

var errDestGone = errors.New("the destination's NBD server is gone")

// upstream returns a negotiated WAN connection for a new QEMU connection:
// the prepared one first; later ones (QEMU reconnecting after a cut) are
// dialled and negotiated now.
func (r *Relay) upstream() (net.Conn, *nbdExport, error) {
	r.upMu.Lock()
	defer r.upMu.Unlock()
	if r.preconn != nil {
		conn, exp := r.preconn, r.prepared
		r.preconn, r.prepared = nil, nil
		if exp != nil {
			return conn, exp, nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.stall())
		defer cancel()
		exp, err := r.negotiate(ctx, conn)
		if errors.Is(err, errDestGone) {
			exp = r.known
		}
		return conn, exp, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*r.stall())
	defer cancel()
	conn, err := r.dialWAN(ctx)
	if err != nil {
		return nil, nil, err
	}
	r.track(conn)
	exp, err := r.negotiate(ctx, conn)
	if err == nil {
		r.reconnects.Add(1)
	}
	if errors.Is(err, errDestGone) {
		exp = r.known
	}
	return conn, exp, err
}

// serveSource answers each source QEMU connection's NBD negotiation
// locally and splices its transmission phase onto a negotiated WAN
// connection.
func (r *Relay) serveSource() {
	r.serveEach(r.srcLn, func(c net.Conn) {
		wan, exp, err := r.upstream()
		if errors.Is(err, errDestGone) && exp != nil {
			// Answer QEMU's requests with errors: its mirror job fails
			// at once, and the source's I/O does not hang on a
			// reconnect that cannot succeed.
			wan.Close()
			c.SetDeadline(time.Now().Add(r.stall()))
			if nbdServeHandshake(c, exp) == nil {
				c.SetDeadline(time.Time{})
				nbdRefuseRequests(c)
			}
			c.Close()
			return
		}
		if err != nil {
			c.Close() // QEMU tries again while its reconnect delay lasts
			if wan != nil {
				wan.Close()
			}
			return
		}
		c.SetDeadline(time.Now().Add(r.stall()))
		if err := nbdServeHandshake(c, exp); err != nil {
			c.Close()
			wan.Close()
			return
		}
		c.SetDeadline(time.Time{})
		var up io.Writer = wan
		if r.Limiter != nil {
			up = &paced{ctx: context.Background(), c: wan, l: r.Limiter}
		}
		pipeTracked(c, wan, &discFilter{w: up}, io.MultiWriter(r.tracker.transmission(), counter{&r.toDest}))
	})
}

// serveEach accepts on ln until it closes and handles each connection in
// its own goroutine; Close closes them (track) and waits for the handlers.
func (r *Relay) serveEach(ln net.Listener, handle func(net.Conn)) {
	defer r.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		r.track(c)
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			handle(c)
		}()
	}
}

type counter struct{ n *atomic.Int64 }

func (c counter) Write(p []byte) (int, error) { c.n.Add(int64(len(p))); return len(p), nil }

// pipeTracked is pipe with the client-to-server half written through up
// (server itself, or a pacer over it) and also fed to t.
func pipeTracked(client, server net.Conn, up io.Writer, t io.Writer) {
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, io.TeeReader(client, t)); done <- struct{}{} }()
	go func() { io.Copy(client, server); done <- struct{}{} }()
	<-done
	client.Close()
	server.Close()
	<-done
}

// pipe copies both ways until either side ends, then closes both.
func pipe(a, b net.Conn) { pipeTracked(a, b, b, io.Discard) }

// discFilter passes the source QEMU's NBD requests to the destination,
// all but NBD_CMD_DISC, the goodbye the source's NBD node sends as it is
// deleted after the mirror: across a WAN it can reach the destination
// before the request to delete the export does, and once the destination
// VM runs (its disk in an iothread) QEMU 7.2 handles that disconnect off
// its main thread and aborts (blockdev-nbd.c:62,
// nbd_blockdev_client_closed), seen between two daemons. Without it the
// destination's end closes when its export is deleted ("hard", on QEMU's
// main loop; see pipeHoldingServer). Dropping it loses nothing: DISC has
// no reply. A stream it cannot follow is passed as it is.
type discFilter struct {
	w     io.Writer
	hdr   [28]byte // a request header being read: its first n bytes
	n     int
	skip  uint64 // write payload bytes still to pass
	lost  bool
	drops int
}

const nbdCmdDisc = 2

func (f *discFilter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if f.lost {
			_, err := f.w.Write(p)
			return n, err
		}
		if f.skip > 0 {
			k := min(f.skip, uint64(len(p)))
			if _, err := f.w.Write(p[:k]); err != nil {
				return n, err
			}
			p, f.skip = p[k:], f.skip-k
			continue
		}
		k := copy(f.hdr[f.n:], p)
		f.n, p = f.n+k, p[k:]
		if f.n < len(f.hdr) {
			return n, nil
		}
		f.n = 0
		h := f.hdr[:]
		if binary.BigEndian.Uint32(h) != nbdRequestMagic {
			f.lost = true
			if _, err := f.w.Write(h); err != nil {
				return n, err
			}
			continue
		}
		typ := binary.BigEndian.Uint16(h[6:])
		if typ == nbdCmdDisc {
			f.drops++
			continue
		}
		if typ == nbdCmdWrite {
			f.skip = uint64(binary.BigEndian.Uint32(h[24:]))
		}
		if _, err := f.w.Write(h); err != nil {
			return n, err
		}
	}
	return n, nil
}

// Close ends every connection and listener.
func (r *Relay) Close() error {
	var errs []error
	if r.srcLn != nil {
		errs = append(errs, r.srcLn.Close())
	}
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	if r.serving {
		r.serving = false
		errs = append(errs, r.Server.StopRelay(context.Background(), RelayStop{Listen: r.DestWAN}))
	}
	for _, e := range errs {
		if e != nil && !errors.Is(e, net.ErrClosed) {
			return e
		}
	}
	return nil
}

// RelayServe asks the destination for the Relay's end.
type RelayServe struct {
	Listen   string        `json:"listen"` // host:port (the destination's WAN address)
	NBD      string        `json:"nbd"`    // the destination QEMU's NBD server, local to it
	Identity Identity      `json:"identity"`
	Stall    time.Duration `json:"stall_ns"` // unacknowledged data this long gives a connection up
}

// RelayStop names the relay end to stop.
type RelayStop struct {
	Listen string `json:"listen"`
}

// relayServing is one Relay's destination end.
type relayServing struct {
	ln    net.Listener
	nbd   string
	stall time.Duration
	dial  func(ctx context.Context, network, addr string) (net.Conn, error)
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns []net.Conn
}

// ServeRelay implements DiskServer.
func (cs *LocalDiskServer) ServeRelay(_ context.Context, req RelayServe) error {
	srv, err := req.Identity.serverTLS(cs.TLS)
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	listen, _ := cs.listen()
	dial := cs.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.relays[req.Listen] != nil {
		return fmt.Errorf("relay: %s already serves", req.Listen)
	}
	ln, err := listen("tcp", req.Listen)
	if err != nil {
		return fmt.Errorf("relay: listen %s: %w", req.Listen, err)
	}
	rs := &relayServing{ln: tls.NewListener(ln, srv), nbd: req.NBD, stall: req.Stall, dial: dial}
	if rs.stall <= 0 {
		rs.stall = 5 * time.Second
	}
	if cs.relays == nil {
		cs.relays = map[string]*relayServing{}
	}
	cs.relays[req.Listen] = rs
	rs.wg.Add(1)
	go rs.serve()
	return nil
}

// StopRelays stops every relay end this server runs (StopRelay for each).
func (cs *LocalDiskServer) StopRelays() {
	cs.mu.Lock()
	var addrs []string
	for a := range cs.relays {
		addrs = append(addrs, a)
	}
	cs.mu.Unlock()
	for _, a := range addrs {
		cs.StopRelay(context.Background(), RelayStop{Listen: a})
	}
}

// StopRelay implements DiskServer.
func (cs *LocalDiskServer) StopRelay(_ context.Context, req RelayStop) error {
	cs.mu.Lock()
	rs := cs.relays[req.Listen]
	delete(cs.relays, req.Listen)
	cs.mu.Unlock()
	if rs == nil {
		return nil
	}
	err := rs.ln.Close()
	rs.mu.Lock()
	for _, c := range rs.conns {
		c.Close()
	}
	rs.mu.Unlock()
	rs.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

func (rs *relayServing) track(c net.Conn) {
	rs.mu.Lock()
	rs.conns = append(rs.conns, c)
	rs.mu.Unlock()
}

// serve connects each WAN connection to the destination QEMU's NBD
// server once the source says the export exists.
func (rs *relayServing) serve() {
	defer rs.wg.Done()
	for {
		c, err := rs.ln.Accept()
		if err != nil {
			return
		}
		rs.track(c)
		rs.wg.Add(1)
		go func() {
			defer rs.wg.Done()
			rs.handle(c)
		}()
	}
}

func (rs *relayServing) handle(c net.Conn) {
	giveUpUnacked(c.(*tls.Conn).NetConn(), rs.stall)
	if err := c.(*tls.Conn).Handshake(); err != nil {
		c.Close()
		return
	}
	// The source says when the export exists: one byte.
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 'N' {
		c.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	nbd, err := rs.dial(ctx, "tcp", rs.nbd)
	cancel()
	if err != nil {
		// The destination QEMU is gone: say so, so the source's NBD
		// requests fail now instead of waiting to reconnect.
		c.Write([]byte(destGone))
		c.Close()
		return
	}
	rs.track(nbd)
	pipeHoldingServer(c, nbd)
}

// pipeHoldingServer is pipe, except that when the client (WAN) side ends
// first and cleanly (the source's end of the mirror), the server side (QEMU's NBD connection) stays open until the
// relay end stops (StopRelay closes it), after the export is gone. Why:
// once the destination VM runs, its disk is in an iothread, and QEMU 7.2
// runs an NBD client's close there when the client hangs up, then aborts
// (blockdev-nbd.c:62: assertion qemu_in_main_thread()). The mirror's
// end (the source deletes its NBD node) reaches this host as the WAN
// side's end, before the request to delete the export does when both
// cross a WAN; deleting the export ("hard") first closes the client on
// QEMU's main thread.
func pipeHoldingServer(client, server net.Conn) {
	fromClient, fromServer := make(chan struct{}), make(chan struct{})
	var clientErr error
	go func() { _, clientErr = io.Copy(server, client); close(fromClient) }()
	go func() {
		io.Copy(client, server)
		// The client is gone (a cut WAN connection the source replaced):
		// keep reading QEMU's replies, or its NBD coroutine blocks on a
		// full socket and the destination hangs when it activates.
		io.Copy(io.Discard, server)
		close(fromServer)
	}()
	select {
	case <-fromServer:
		client.Close()
		server.Close()
		<-fromClient
	case <-fromClient:
		client.Close()
		if clientErr != nil {
			// A cut WAN connection (the source reconnects on a new one,
			// the VM not yet running here): QEMU must let this client go
			// now, or it waits for it when it activates the disk.
			server.Close()
		}
		<-fromServer // QEMU closes it (export deleted), or StopRelay does
	}
}
