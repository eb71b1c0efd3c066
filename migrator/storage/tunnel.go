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
)

// Tunnel carries one stream between the hosts, QEMU's memory migration,
// over a TLS connection set up beforehand (the migration's identity, as
// Relay uses for the disk): the source QEMU connects to a local unix
// socket, and the destination end connects to the destination QEMU's
// local address when the stream begins. Why: QEMU 7.2's own TLS handshake
// for the migration stream stalled the guest for ~95 ms at the start of
// the memory copy in the lab; here nothing QEMU waits for crosses the WAN,
// and the stream is still encrypted and authenticated there.
type Tunnel struct {
	DialSource func(ctx context.Context, network, addr string) (net.Conn, error)
	DialDest   func(ctx context.Context, network, addr string) (net.Conn, error)
	ListenDest func(network, addr string) (net.Listener, error)

	DestWAN    string // host:port the destination end listens on
	DestAddr   string // host:port of the destination QEMU's incoming migration (local to it)
	SourceSock string // unix socket the source QEMU migrates to
	Stall      time.Duration

	peer    *peerTLS
	wanLn   net.Listener
	srcLn   net.Listener
	preconn net.Conn
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
	sent    atomic.Int64
}

// URI is the migration URI the source QEMU is given.
func (t *Tunnel) URI() string { return "unix:" + t.SourceSock }

// Sent is what the source QEMU sent through the tunnel.
func (t *Tunnel) Sent() int64 { return t.sent.Load() }

func (t *Tunnel) stall() time.Duration {
	if t.Stall > 0 {
		return t.Stall
	}
	return 5 * time.Second
}

// Start listens at both ends and opens the WAN connection in advance.
func (t *Tunnel) Start(ctx context.Context) error {
	var err error
	if t.peer, err = newPeerTLS(); err != nil {
		return err
	}
	ln, err := t.ListenDest("tcp", t.DestWAN)
	if err != nil {
		return fmt.Errorf("tunnel: listen %s: %w", t.DestWAN, err)
	}
	t.wanLn = tls.NewListener(ln, t.peer.server())
	t.wg.Add(1)
	go t.serveDest()
	if t.srcLn, err = net.Listen("unix", t.SourceSock); err != nil {
		t.Close()
		return fmt.Errorf("tunnel: listen %s: %w", t.SourceSock, err)
	}
	if t.preconn, err = dialPeer(ctx, t.DialSource, t.DestWAN, t.peer, t.stall()); err != nil {
		t.Close()
		return fmt.Errorf("tunnel: %w", err)
	}
	t.track(t.preconn)
	t.wg.Add(1)
	go t.serveSource()
	return nil
}

func (t *Tunnel) track(c net.Conn) {
	t.mu.Lock()
	t.conns = append(t.conns, c)
	t.mu.Unlock()
}

// serveSource pairs QEMU's connection with the prepared WAN connection
// (a later one, as after a cancelled attempt, with a new one).
func (t *Tunnel) serveSource() {
	defer t.wg.Done()
	wan := t.preconn
	for {
		c, err := t.srcLn.Accept()
		if err != nil {
			return
		}
		t.track(c)
		if wan == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*t.stall())
			wan, err = dialPeer(ctx, t.DialSource, t.DestWAN, t.peer, t.stall())
			cancel()
			if err != nil {
				c.Close()
				continue
			}
			t.track(wan)
		}
		// The destination end connects to its QEMU when told: one byte.
		if _, err := wan.Write([]byte{'G'}); err != nil {
			c.Close()
			wan.Close()
			wan = nil
			continue
		}
		t.wg.Add(1)
		go func(c, wan net.Conn) {
			defer t.wg.Done()
			pipeTracked(c, wan, wan, counter{&t.sent})
		}(c, wan)
		wan = nil
	}
}

func (t *Tunnel) serveDest() {
	defer t.wg.Done()
	for {
		c, err := t.wanLn.Accept()
		if err != nil {
			return
		}
		t.track(c)
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			giveUpUnacked(c.(*tls.Conn).NetConn(), t.stall())
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err != nil || b[0] != 'G' {
				c.Close()
				return
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			q, err := t.DialDest(ctx, "tcp", t.DestAddr)
			cancel()
			if err != nil {
				c.Close()
				return
			}
			t.track(q)
			pipe(c, q)
		}()
	}
}

// Close ends every connection and listener.
func (t *Tunnel) Close() error {
	var errs []error
	for _, l := range []net.Listener{t.wanLn, t.srcLn} {
		if l != nil {
			if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, err)
			}
		}
	}
	t.mu.Lock()
	for _, c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
	return errors.Join(errs...)
}
