package storage

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
)

// recorder forwards TCP to target and keeps what passed towards it.
type recorder struct {
	ln     net.Listener
	mu     sync.Mutex
	toward bytes.Buffer
}

func newRecorder(t *testing.T, target string) *recorder {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &recorder{ln: ln}
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
			go func() { io.Copy(io.MultiWriter(d, r), c); d.Close() }()
			go func() { io.Copy(c, d); c.Close() }()
		}
	}()
	return r
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.toward.Write(p)
}

// TestTunnelCarriesStreamEncrypted: what the source writes into the
// tunnel's socket reaches the destination's local listener unchanged, and
// none of it crosses the "WAN" in the clear.
func TestTunnelCarriesStreamEncrypted(t *testing.T) {
	dest, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer dest.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := dest.Accept()
		if err != nil {
			return
		}
		b, _ := io.ReadAll(c)
		got <- b
	}()
	wan := freePort(t)
	wanAddr := net.JoinHostPort("127.0.0.1", itoa(wan))
	rec := newRecorder(t, wanAddr)
	var d net.Dialer
	tu := &Tunnel{
		DialSource: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", rec.ln.Addr().String())
		},
		DialDest: d.DialContext, ListenDest: net.Listen,
		DestWAN: wanAddr, DestAddr: dest.Addr().String(), SourceSock: filepath.Join(t.TempDir(), "mig.sock"),
	}
	if err := tu.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer tu.Close()
	c, err := net.Dial("unix", tu.SourceSock)
	if err != nil {
		t.Fatal(err)
	}
	stream := bytes.Repeat([]byte("QEVM guest memory page "), 50000)
	if _, err := c.Write(stream); err != nil {
		t.Fatal(err)
	}
	c.Close()
	b := <-got
	if !bytes.Equal(b, stream) {
		t.Fatalf("destination got %d bytes, want the %d sent", len(b), len(stream))
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.toward.Len() < len(stream) || bytes.Contains(rec.toward.Bytes(), []byte("QEVM")) {
		t.Fatalf("WAN saw %d bytes, plaintext: %v", rec.toward.Len(), bytes.Contains(rec.toward.Bytes(), []byte("QEVM")))
	}
	if tu.Sent() != int64(len(stream)) {
		t.Fatalf("sent %d, want %d", tu.Sent(), len(stream))
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
