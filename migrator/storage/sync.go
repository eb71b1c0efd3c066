package storage

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// ChunkedSync runs the chunked engine between two hosts: rounds while the
// VM runs (Converge), then one inside the pause (Final). Each round is one
// mutually authenticated TLS 1.3 connection (per-migration certificate);
// a connection that moves nothing for Stall is cut and redialled, and the
// destination's manifest makes the new round resume where the old stopped.
type ChunkedSync struct {
	Source ChunkedSource // on the source host
	Dest   ChunkedDest   // on the destination host: its image (Path)

	DialSource func(ctx context.Context, network, addr string) (net.Conn, error)
	DestWAN    string // host:port the destination end listens on
	// Server is the destination host's end (vmhopd on host B); nil: a
	// LocalDiskServer in this process that listens with ListenDest.
	Server     DiskServer
	ListenDest func(network, addr string) (net.Listener, error)
	// TLS, if set, is the source end's TLS with its host identity (see
	// Relay.TLS); nil: a per-migration Identity made here.
	TLS *tls.Config

	// Limiter, if set, paces what the source sends (bytes per second). The
	// migrator shares it with the memory migration's budget.
	Limiter *rate.Limiter
	// Tuning is how each round's WAN socket yields to the VM's own
	// traffic (its pacing is at Limiter's rate).
	Tuning WANTuning
	// FinalDelta: a live round that sent at most this many bytes ends the
	// live rounds; MaxRounds bounds them anyway.
	FinalDelta int64
	MaxRounds  int
	Stall      time.Duration // default 5s
	Retry      time.Duration // how long Converge redials after cuts; default 2m
	Log        *slog.Logger

	tls     *peerTLS
	serving bool
	sent    atomic.Int64
	rounds  atomic.Int32
	cuts    atomic.Int32
}

// SyncProgress is one report of the live rounds.
type SyncProgress struct {
	Round           int
	Scanned, Chunks int           // of the current round
	Sent            int64         // bytes on the wire so far, all rounds
	Rate            float64       // bytes per second on the wire, this round
	ETA             time.Duration // to the end of this round's scan
}

// Sent is what the source wrote to the destination, all rounds and cut
// attempts included (before TLS).
func (s *ChunkedSync) Sent() int64 { return s.sent.Load() }

// Rounds is how many rounds completed; Cuts how many connections broke.
func (s *ChunkedSync) Rounds() int { return int(s.rounds.Load()) }
func (s *ChunkedSync) Cuts() int   { return int(s.cuts.Load()) }

func (s *ChunkedSync) stall() time.Duration {
	if s.Stall > 0 {
		return s.Stall
	}
	return 5 * time.Second
}

// Start makes the per-migration identity and has the destination serve
// rounds with it.
func (s *ChunkedSync) Start(ctx context.Context) error {
	if s.Log == nil {
		s.Log = slog.Default()
	}
	if s.Server == nil {
		s.Server = &LocalDiskServer{Listen: s.ListenDest, Log: s.Log}
	}
	var id Identity
	if s.TLS == nil {
		var err error
		if s.tls, err = newPeerTLS(); err != nil {
			return err
		}
		if id, err = s.tls.identity(); err != nil {
			return err
		}
	}
	if err := s.Server.ServeChunked(ctx, ChunkedServe{Listen: s.DestWAN, Path: s.Dest.Path, Identity: id, Stall: s.stall()}); err != nil {
		return err
	}
	s.serving = true
	return nil
}

// DiskServer is the destination host's end of the disk streams: on a
// deployment, what vmhopd on host B serves; in one process, a
// LocalDiskServer. Requests encode to JSON; each carries the
// per-migration Identity the source made (the only certificate either end
// accepts).
type DiskServer interface {
	// ServeChunked listens at req.Listen and serves the chunked engine's
	// rounds into req.Path, one at a time.
	ServeChunked(ctx context.Context, req ChunkedServe) error
	// StopChunked closes the listener and any round in progress (its
	// manifest saved). Idempotent.
	StopChunked(ctx context.Context, req ChunkedStop) error
	// ServeRelay listens at req.Listen for the Relay's WAN connections and
	// connects each to the destination QEMU's NBD server (req.NBD).
	ServeRelay(ctx context.Context, req RelayServe) error
	// StopRelay closes the listener and its connections. Idempotent.
	StopRelay(ctx context.Context, req RelayStop) error
}

// ChunkedServe asks the destination to serve rounds.
type ChunkedServe struct {
	Listen   string        `json:"listen"` // host:port (the destination's WAN address)
	Path     string        `json:"path"`   // the destination image
	Identity Identity      `json:"identity"`
	Stall    time.Duration `json:"stall_ns"` // a connection that moves nothing this long is cut
}

// ChunkedStop names the server to stop.
type ChunkedStop struct {
	Listen string `json:"listen"`
}

// LocalDiskServer serves the disk streams' destination ends on this host.
type LocalDiskServer struct {
	Listen func(network, addr string) (net.Listener, error) // nil: net.Listen
	// TLS is this host's own server TLS for requests that carry no
	// per-migration Identity (vmhopd: its peer API's, which admits only
	// its configured peers' certificates); nil refuses them.
	TLS  *tls.Config
	Dial func(ctx context.Context, network, addr string) (net.Conn, error) // to the local NBD server; nil: net.Dialer
	Log  *slog.Logger

	mu     sync.Mutex
	live   map[string]*chunkedServing // by listen address
	relays map[string]*relayServing
}

var _ DiskServer = (*LocalDiskServer)(nil)

func (cs *LocalDiskServer) listen() (func(network, addr string) (net.Listener, error), *slog.Logger) {
	listen, log := cs.Listen, cs.Log
	if listen == nil {
		listen = net.Listen
	}
	if log == nil {
		log = slog.Default()
	}
	return listen, log
}

// chunkedServing is one destination image being served.
type chunkedServing struct {
	dest  ChunkedDest
	stall time.Duration
	log   *slog.Logger
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	cur   net.Conn
	done  chan struct{}
	// lastErr is why the last round ended, if the destination ended it
	// for a local reason (guarded by mu; ChunkedError reports it).
	lastErr error
}

// ServeChunked implements DiskServer.
func (cs *LocalDiskServer) ServeChunked(_ context.Context, req ChunkedServe) error {
	srv, err := req.Identity.serverTLS(cs.TLS)
	if err != nil {
		return fmt.Errorf("chunked sync: %w", err)
	}
	listen, log := cs.listen()
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.live[req.Listen] != nil {
		return fmt.Errorf("chunked sync: %s already serves", req.Listen)
	}
	ln, err := listen("tcp", req.Listen)
	if err != nil {
		return fmt.Errorf("chunked sync: listen %s: %w", req.Listen, err)
	}
	sv := &chunkedServing{dest: ChunkedDest{Path: req.Path}, stall: req.Stall, log: log, ln: tls.NewListener(ln, srv)}
	if sv.stall <= 0 {
		sv.stall = 5 * time.Second
	}
	if cs.live == nil {
		cs.live = map[string]*chunkedServing{}
	}
	cs.live[req.Listen] = sv
	sv.wg.Add(1)
	go sv.serve()
	return nil
}

// StopChunked implements DiskServer.
func (cs *LocalDiskServer) StopChunked(_ context.Context, req ChunkedStop) error {
	cs.mu.Lock()
	sv := cs.live[req.Listen]
	delete(cs.live, req.Listen)
	cs.mu.Unlock()
	if sv == nil {
		return nil
	}
	return sv.close()
}

// serve runs the destination's rounds one at a time: a new connection
// means the source gave up on the old one, which is closed and finished
// (its manifest saved) before the new round reads the manifest.
func (s *chunkedServing) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		c.SetDeadline(time.Now().Add(s.stall))
		if err := c.(*tls.Conn).Handshake(); err != nil {
			s.log.Warn("chunked sync: handshake refused", "from", c.RemoteAddr(), "err", err)
			c.Close()
			continue
		}
		s.mu.Lock()
		prev, prevDone := s.cur, s.done
		done := make(chan struct{})
		s.cur, s.done = c, done
		s.mu.Unlock()
		if prev != nil {
			prev.Close()
			<-prevDone
		}
		go func() {
			defer close(done)
			err := s.dest.Serve(&stallConn{Conn: c, d: s.stall})
			if err != nil {
				s.log.Warn("chunked sync: destination round ended", "err", err)
			}
			if errors.Is(err, ErrNoSpace) {
				s.mu.Lock()
				s.lastErr = err
				s.mu.Unlock()
			}
			c.Close()
		}()
	}
}

// close stops the listener and any round in progress.
func (s *chunkedServing) close() error {
	err := s.ln.Close()
	s.mu.Lock()
	if s.cur != nil {
		s.cur.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	if done != nil {
		<-done
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// refused says whether err is an authentication failure between the
// ends (a TLS alert from the other end, or its certificate refused here):
// no reconnection mends that.
func refused(err error) bool {
	var cv *tls.CertificateVerificationError
	if errors.Is(err, errTuning) {
		return true // the host's kernel refuses the socket option: every redial would too
	}
	// The other end's alert has no exported type (crypto/tls's alert
	// reaches us as "remote error: tls: ...").
	return errors.As(err, &cv) || strings.Contains(err.Error(), "remote error: tls: ")
}

// round runs one round of src on a fresh connection, its socket paced by
// Tuning if kernelPaced (the live rounds), unpaced if not (Final: the
// pause).
func (s *ChunkedSync) round(ctx context.Context, src ChunkedSource, kernelPaced bool) (RoundStats, error) {
	dctx, cancel := context.WithTimeout(ctx, s.stall())
	raw, err := s.DialSource(dctx, "tcp", s.DestWAN)
	cancel()
	if err != nil {
		return RoundStats{}, err
	}
	defer raw.Close()
	pacer, err := s.Tuning.apply(raw, s.Limiter)
	if err != nil {
		return RoundStats{}, fmt.Errorf("chunked: %s: %w", s.DestWAN, err)
	}
	if !kernelPaced {
		pacer.Lift() // refused: the round goes on paced
	}
	cfg := s.TLS
	if cfg == nil {
		cfg = s.tls.client()
	}
	tc := tls.Client(raw, cfg)
	hctx, cancel := context.WithTimeout(ctx, s.stall())
	err = tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		return RoundStats{}, err
	}
	// Cancelling ctx ends the round at once, not at the next stall.
	stop := context.AfterFunc(ctx, func() { tc.Close() })
	defer stop()
	conn := &paced{ctx: ctx, c: &stallConn{Conn: tc, d: s.stall()}, l: s.Limiter, n: &s.sent}
	st, err := src.Round(ctx, conn)
	if err == nil {
		s.rounds.Add(1)
	}
	return st, err
}

// Converge runs live rounds until one is small (FinalDelta) or MaxRounds
// ran. A cut connection is redialled until Retry passes; the round then
// resumes from the destination's manifest.
func (s *ChunkedSync) Converge(ctx context.Context, progress func(SyncProgress)) error {
	retry := s.Retry
	if retry == 0 {
		retry = 2 * time.Minute
	}
	for n := 1; ; n++ {
		var cutSince time.Time
		for {
			t0, base := time.Now(), s.Sent()
			src := s.Source
			if progress != nil {
				src.Progress = func(p RoundProgress) {
					el := time.Since(t0)
					sp := SyncProgress{Round: n, Scanned: p.Scanned, Chunks: p.Chunks, Sent: s.Sent()}
					if el > 0 {
						sp.Rate = float64(s.Sent()-base) / el.Seconds()
					}
					if p.Scanned > 0 {
						sp.ETA = time.Duration(float64(el) * float64(p.Chunks-p.Scanned) / float64(p.Scanned))
					}
					progress(sp)
				}
			}
			st, err := s.round(ctx, src, true)
			if err == nil {
				s.Log.Info("chunked sync: round", "round", n, "chunks_sent", st.Sent, "lz4", st.Compressed,
					"copies", st.Copied, "zeros", st.Zero, "bytes", st.Bytes, "took", time.Since(t0).Round(time.Millisecond))
				if st.Bytes <= s.FinalDelta || n >= max(s.MaxRounds, 1) {
					return nil
				}
				break
			}
			if errors.Is(err, ErrDigestMismatch) || ctx.Err() != nil {
				return err
			}
			if refused(err) {
				return fmt.Errorf("chunked sync: round %d: the destination end refused this host's identity (or this host refused its): %w", n, err)
			}
			s.cuts.Add(1)
			if derr := s.destFailure(ctx, n); derr != nil {
				return derr
			}
			if cutSince.IsZero() {
				cutSince = time.Now()
			}
			if time.Since(cutSince) > retry {
				return fmt.Errorf("chunked sync: round %d: connection lost for over %s: %w", n, retry, err)
			}
			s.Log.Warn("chunked sync: connection cut, resuming", "round", n, "err", err)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Second):
			}
		}
	}
}

// Final is the round inside the pause: no retry (a cut here aborts the
// migration; the source still holds everything). Its digest comparison is
// the migration's proof that the destination image is the source's.
// Its socket is unpaced (the kernel's pacing, WANTuning, lifted: every
// byte is paused time); Limiter still counts its bytes.
func (s *ChunkedSync) Final(ctx context.Context) (RoundStats, error) {
	st, err := s.round(ctx, s.Source, false)
	if err != nil {
		s.cuts.Add(1)
		if derr := s.destFailure(ctx, int(s.rounds.Load())+1); derr != nil {
			return st, derr
		}
		return st, fmt.Errorf("chunked sync: final round: %w", err)
	}
	return st, nil
}

// Close stops the destination's listener and any round in progress.
func (s *ChunkedSync) Close() error {
	if !s.serving {
		return nil
	}
	s.serving = false
	return s.Server.StopChunked(context.Background(), ChunkedStop{Listen: s.DestWAN})
}

// stallConn fails a read or write that makes no progress for d.
type stallConn struct {
	net.Conn
	d time.Duration
}

func (c *stallConn) Read(p []byte) (int, error) {
	c.Conn.SetReadDeadline(time.Now().Add(c.d))
	return c.Conn.Read(p)
}

func (c *stallConn) Write(p []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(c.d))
	return c.Conn.Write(p)
}

// paced writes through a token bucket in bytes (nil: no limit) and counts
// what it wrote into n (if set).
type paced struct {
	ctx context.Context
	c   io.ReadWriter
	l   *rate.Limiter
	n   *atomic.Int64
}

func (p *paced) Read(b []byte) (int, error) { return p.c.Read(b) }

func (p *paced) Write(b []byte) (int, error) {
	done := 0
	for done < len(b) {
		k := len(b) - done
		if p.l != nil {
			k = min(k, p.l.Burst())
			if err := p.l.WaitN(p.ctx, k); err != nil {
				return done, err
			}
		}
		n, err := p.c.Write(b[done : done+k])
		done += n
		if p.n != nil {
			p.n.Add(int64(n))
		}
		if err != nil {
			return done, err
		}
	}
	return done, nil
}
