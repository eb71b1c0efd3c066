// Package userspace is the network-continuity fallback where eBPF cannot
// load (no CAP_BPF, old kernel): on the old host, a TCP and UDP proxy
// accepts on the VM's old address and connects to its new one, so clients
// that still use the old DNS answer reach the VM.
//
// Connections that were open when the VM moved cannot survive this mode:
// their packets reach a proxy that knows nothing of them, and it answers
// with a reset. Only the eBPF datapath carries in-flight TCP.
package userspace

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Config is one proxied VM.
type Config struct {
	OldIP    netip.Addr // address to accept on (must be local: see AddressAdder)
	NewIP    netip.Addr // where the VM now is
	TCPPorts []uint16   // service ports to proxy
	UDPPorts []uint16
	UDPIdle  time.Duration // a UDP session without traffic this long ends; default 60s
	Log      *slog.Logger
	// Dial opens the upstream connections; nil uses net.Dialer. (Tests pass
	// one that dials from the host's network namespace: goroutines do not
	// inherit a namespace a thread entered.)
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// Stats counts what the proxy did.
type Stats struct {
	TCPConns, UDPSessions, BytesIn, BytesOut atomic.Uint64
}

// Proxy is a running userspace proxy.
type Proxy struct {
	cfg     Config
	Stats   Stats
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	closers []io.Closer
}

// Start listens on every port and proxies until Close. Listening on OldIP
// needs the address on a local interface; the caller adds it.
func Start(cfg Config) (*Proxy, error) {
	if cfg.UDPIdle == 0 {
		cfg.UDPIdle = 60 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Dial == nil {
		d := &net.Dialer{Timeout: 10 * time.Second}
		cfg.Dial = d.DialContext
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{cfg: cfg, cancel: cancel}
	for _, port := range cfg.TCPPorts {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(cfg.OldIP, port).String())
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("userspace proxy: listen tcp %s:%d: %w", cfg.OldIP, port, err)
		}
		p.closers = append(p.closers, ln)
		p.wg.Add(1)
		go func() { defer p.wg.Done(); p.serveTCP(ctx, ln, port) }()
	}
	for _, port := range cfg.UDPPorts {
		pc, err := net.ListenPacket("udp", netip.AddrPortFrom(cfg.OldIP, port).String())
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("userspace proxy: listen udp %s:%d: %w", cfg.OldIP, port, err)
		}
		p.closers = append(p.closers, pc)
		p.wg.Add(1)
		go func() { defer p.wg.Done(); p.serveUDP(ctx, pc, port) }()
	}
	cfg.Log.Warn("network continuity: userspace proxy (eBPF unavailable): new connections to the old address are proxied; open TCP connections do not survive the move",
		"old_ip", cfg.OldIP, "new_ip", cfg.NewIP, "tcp", cfg.TCPPorts, "udp", cfg.UDPPorts)
	return p, nil
}

// Close stops accepting and ends every session.
func (p *Proxy) Close() error {
	p.cancel()
	for _, c := range p.closers {
		c.Close()
	}
	p.wg.Wait()
	return nil
}

func (p *Proxy) serveTCP(ctx context.Context, ln net.Listener, port uint16) {
	target := netip.AddrPortFrom(p.cfg.NewIP, port).String()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		p.Stats.TCPConns.Add(1)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer c.Close()
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			u, err := p.cfg.Dial(dctx, "tcp", target)
			cancel()
			if err != nil {
				p.cfg.Log.Info("userspace proxy: dial", "target", target, "err", err)
				return
			}
			defer u.Close()
			stop := context.AfterFunc(ctx, func() { c.Close(); u.Close() })
			defer stop()
			done := make(chan struct{})
			go func() {
				n, _ := io.Copy(u, c)
				p.Stats.BytesIn.Add(uint64(n))
				if tc, ok := u.(*net.TCPConn); ok {
					tc.CloseWrite()
				}
				close(done)
			}()
			n, _ := io.Copy(c, u)
			p.Stats.BytesOut.Add(uint64(n))
			if tc, ok := c.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			<-done
		}()
	}
}

func (p *Proxy) serveUDP(ctx context.Context, pc net.PacketConn, port uint16) {
	target := netip.AddrPortFrom(p.cfg.NewIP, port).String()
	var mu sync.Mutex
	sessions := map[string]net.Conn{}
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			mu.Lock()
			for _, s := range sessions {
				s.Close()
			}
			mu.Unlock()
			return
		}
		key := from.String()
		mu.Lock()
		s, ok := sessions[key]
		if !ok {
			s, err = p.cfg.Dial(ctx, "udp", target)
			if err != nil {
				mu.Unlock()
				continue
			}
			sessions[key] = s
			p.Stats.UDPSessions.Add(1)
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				b := make([]byte, 65536)
				for {
					s.SetReadDeadline(time.Now().Add(p.cfg.UDPIdle))
					k, err := s.Read(b)
					if err != nil {
						break // idle past UDPIdle, closed, or the target refused
					}
					p.Stats.BytesOut.Add(uint64(k))
					pc.WriteTo(b[:k], from)
				}
				mu.Lock()
				delete(sessions, key)
				mu.Unlock()
				s.Close()
			}()
		}
		mu.Unlock()
		p.Stats.BytesIn.Add(uint64(n))
		s.Write(buf[:n])
	}
}
