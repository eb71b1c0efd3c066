package storage

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// blackhole forwards TCP to target until hold is set: then it stops
// moving bytes (connections stay open, as in a WAN cut).
type blackhole struct {
	ln      net.Listener
	target  string
	hold    atomic.Bool
	forward atomic.Int64
}

func newBlackhole(t *testing.T, target string) *blackhole {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &blackhole{ln: ln, target: target}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			// Buffers of a WAN's size, not loopback's megabytes: what a cut
			// loses in flight stays small, as it would be.
			small(c)
			small(d)
			go b.copy(d, c)
			go b.copy(c, d)
		}
	}()
	return b
}

func (b *blackhole) copy(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		for b.hold.Load() {
			time.Sleep(10 * time.Millisecond)
		}
		n, err := src.Read(buf)
		if n > 0 {
			b.forward.Add(int64(n))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func small(c net.Conn) net.Conn {
	c.(*net.TCPConn).SetReadBuffer(128 << 10)
	c.(*net.TCPConn).SetWriteBuffer(128 << 10)
	return c
}

func newSync(t *testing.T, size int64) (*ChunkedSync, *blackhole) {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.vdi")
	f, _ := os.Create(src)
	f.Truncate(size)
	f.Close()
	randomAt(t, src, 0, size/2)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	bh := newBlackhole(t, addr)
	var d net.Dialer
	s := &ChunkedSync{
		Source: ChunkedSource{Path: src, Chunk: mib, Compress: true},
		Dest:   ChunkedDest{Path: filepath.Join(dir, "copy.vdi")},
		DialSource: func(ctx context.Context, _, _ string) (net.Conn, error) {
			c, err := d.DialContext(ctx, "tcp", bh.ln.Addr().String())
			if err != nil {
				return nil, err
			}
			return small(c), nil
		},
		ListenDest: net.Listen,
		DestWAN:    addr,
		FinalDelta: 2 * mib, MaxRounds: 5,
		Stall: 400 * time.Millisecond,
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, bh
}

// TestChunkedSyncResumesAfterWANCut: the WAN stops carrying anything for
// 1.5 s in the middle of the bulk round; the stalled connection is cut,
// a new one resumes from the destination's manifest, and the bytes sent
// stay near the data's size. Then the final round, and digests match.
func TestChunkedSyncResumesAfterWANCut(t *testing.T) {
	s, bh := newSync(t, 64*mib) // 32 MiB of random data, the rest holes
	s.Limiter = rate.NewLimiter(64*mib, 256<<10)
	// The rounds' sockets, kernel-paced at the budget: a duplicate of each
	// descriptor keeps its pacing readable after the round closed it.
	s.Tuning = WANTuning{Pacing: PacingBudget}
	var socks []*os.File
	dial := s.DialSource
	s.DialSource = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok && err == nil {
			f, ferr := tc.File()
			if ferr != nil {
				t.Fatal(ferr)
			}
			t.Cleanup(func() { f.Close() })
			socks = append(socks, f)
		}
		return c, err
	}
	pacing := func(f *os.File) int {
		p, err := unix.GetsockoptInt(int(f.Fd()), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	go func() {
		for bh.forward.Load() < 12*mib {
			time.Sleep(5 * time.Millisecond)
		}
		bh.hold.Store(true)
		time.Sleep(1500 * time.Millisecond)
		bh.hold.Store(false)
	}()
	var last SyncProgress
	t0 := time.Now()
	if err := s.Converge(context.Background(), func(p SyncProgress) { last = p }); err != nil {
		t.Fatalf("converge: %v", err)
	}
	took := time.Since(t0)
	t.Logf("converged in %s: %d rounds, %d cuts, %d KiB sent; last progress %+v", took.Round(time.Millisecond), s.Rounds(), s.Cuts(), s.Sent()>>10, last)
	if s.Cuts() < 1 {
		t.Fatal("the stall was not noticed")
	}
	if s.Sent() > 32*mib*11/10 {
		t.Fatalf("sent %d bytes for 32 MiB of data: the copy restarted", s.Sent())
	}
	// At 64 MiB/s, 32 MiB take at least half a second, plus the stall.
	if took < 1500*time.Millisecond {
		t.Fatalf("converged in %s: the limiter or the stall did not hold", took)
	}
	randomAt(t, s.Source.Path, 40*mib, 8192) // written just before the pause
	st, err := s.Final(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Sent != 1 {
		t.Fatalf("final round: %+v, want 1 chunk", st)
	}
	// Live rounds paced, the final one (the pause) not.
	if len(socks) < 2 {
		t.Fatalf("%d round sockets seen, want live rounds and the final one", len(socks))
	}
	for i, f := range socks[:len(socks)-1] {
		if got := pacing(f); got != 64*mib*102/100 {
			t.Fatalf("live round %d paced at %d bytes/s, want %d", i+1, got, 64*mib*102/100)
		}
	}
	if got := pacing(socks[len(socks)-1]); !unpaced(got) {
		t.Fatalf("final round paced at %d bytes/s, want unlimited", got)
	}
	a, _, _ := Digest(s.Source.Path)
	b, _, _ := Digest(s.Dest.Path)
	if !bytes.Equal(a, b) {
		t.Fatal("images differ")
	}
}

// TestChunkedSyncRefusesStranger: a client without this migration's
// certificate gets nothing and changes nothing.
func TestChunkedSyncRefusesStranger(t *testing.T) {
	s, _ := newSync(t, 8*mib)
	other := &ChunkedSync{DialSource: s.DialSource, DestWAN: s.DestWAN, Stall: s.Stall}
	var err error
	if other.tls, err = newPeerTLS(); err != nil {
		t.Fatal(err)
	}
	if _, err := other.round(context.Background(), s.Source, true); err == nil {
		t.Fatal("a round with another certificate succeeded")
	} else {
		t.Logf("refused: %v", err)
	}
	if _, err := os.Stat(s.Dest.Path); !os.IsNotExist(err) {
		t.Fatalf("destination image touched: %v", err)
	}
}
