package storage

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Relay carries the disk mirror's NBD connection between the hosts over a
// TLS connection that is set up before QEMU asks for it.
//
// Why: QEMU 7.2 connects an NBD block node synchronously, holding its main
// lock; the guest's network stops until the TCP, TLS and NBD handshakes
// are done — about 13 WAN round trips, half a second on the lab's WAN. With
// the relay, QEMU's connection is local at both ends and only the NBD
// negotiation crosses the WAN.
//
// Both ends hold the same per-migration key and certificate (the way both
// QEMUs would hold a pre-shared key) and accept only that certificate.
type Relay struct {
	// Dial opens the WAN connection at the source host and the local NBD
	// connection at the destination host (tests pass namespace-aware ones).
	DialSource func(ctx context.Context, network, addr string) (net.Conn, error)
	DialDest   func(ctx context.Context, network, addr string) (net.Conn, error)
	// ListenDest listens on the destination host's WAN address.
	ListenDest func(network, addr string) (net.Listener, error)

	DestWAN    string // host:port the destination end listens on
	DestNBD    string // host:port of the destination QEMU's NBD server (local to it)
	SourceSock string // unix socket the source QEMU connects to
	// Limiter, if set, paces the bytes to the destination (shared with the
	// memory stream's budget by the migrator).
	Limiter *rate.Limiter

	peer    *peerTLS
	wanLn   net.Listener
	srcLn   net.Listener
	preconn net.Conn
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
	tracker nbdTracker
	toDest  atomic.Int64 // bytes from the source QEMU to the destination
}

// BytesToDest is how many bytes the source sent to the destination
// through the relay (NBD payload and headers, before TLS).
func (r *Relay) BytesToDest() int64 { return r.toDest.Load() }

// ResetTracking starts recording which clusters the source writes to the
// destination from now on.
func (r *Relay) ResetTracking() { r.tracker.reset() }

// Written returns the clusters (of TrackGranularity) written through the
// relay since ResetTracking, and false if the stream could not be followed.
func (r *Relay) Written() ([]uint64, bool) { return r.tracker.snapshot() }

// Start listens at both ends and opens the TLS connection in advance.
func (r *Relay) Start(ctx context.Context) error {
	var err error
	if r.peer, err = newPeerTLS(); err != nil {
		return err
	}
	ln, err := r.ListenDest("tcp", r.DestWAN)
	if err != nil {
		return fmt.Errorf("relay: listen %s: %w", r.DestWAN, err)
	}
	r.wanLn = tls.NewListener(ln, r.peer.server())
	r.wg.Add(1)
	go r.serveDest()
	src, err := net.Listen("unix", r.SourceSock)
	if err != nil {
		r.Close()
		return fmt.Errorf("relay: listen %s: %w", r.SourceSock, err)
	}
	r.srcLn = src
	raw, err := r.DialSource(ctx, "tcp", r.DestWAN)
	if err != nil {
		r.Close()
		return fmt.Errorf("relay: dial %s: %w", r.DestWAN, err)
	}
	tc := tls.Client(raw, r.peer.client())
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		r.Close()
		return fmt.Errorf("relay: tls handshake: %w", err)
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

// serveSource pairs the first QEMU connection with the prepared TLS one.
func (r *Relay) serveSource() {
	defer r.wg.Done()
	c, err := r.srcLn.Accept()
	if err != nil {
		return
	}
	r.track(c)
	var toDest io.ReadWriter = r.preconn
	if r.Limiter != nil {
		toDest = &paced{ctx: context.Background(), c: r.preconn, l: r.Limiter}
	}
	pipeTracked(c, r.preconn, toDest, io.MultiWriter(&r.tracker, counter{&r.toDest}))
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

func (r *Relay) serveDest() {
	defer r.wg.Done()
	for {
		c, err := r.wanLn.Accept()
		if err != nil {
			return
		}
		r.track(c)
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			if err := c.(*tls.Conn).Handshake(); err != nil {
				c.Close()
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			nbd, err := r.DialDest(ctx, "tcp", r.DestNBD)
			cancel()
			if err != nil {
				c.Close()
				return
			}
			r.track(nbd)
			pipe(c, nbd)
		}()
	}
}

// pipe copies both ways until either side ends, then closes both.
func pipe(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		io.Copy(dst, src)
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	a.Close()
	b.Close()
	<-done
}

// Close ends every connection and listener.
func (r *Relay) Close() error {
	var errs []error
	for _, l := range []net.Listener{r.wanLn, r.srcLn} {
		if l != nil {
			errs = append(errs, l.Close())
		}
	}
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	for _, e := range errs {
		if e != nil && !errors.Is(e, net.ErrClosed) {
			return e
		}
	}
	return nil
}
