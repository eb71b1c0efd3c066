package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmhop/vmhop/daemon/pki"
	"github.com/vmhop/vmhop/internal/config"
)

// testCA is a CA and the directory its files are written to.
type testCA struct {
	ca  *pki.CA
	dir string
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	ca, err := pki.NewCA("vmhop test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return &testCA{ca: ca, dir: dir}
}

// issue writes a host certificate and key for name and returns their paths.
func (c *testCA) issue(t *testing.T, name string) (cert, key string) {
	t.Helper()
	certPEM, keyPEM, err := c.ca.Issue(name, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, key = filepath.Join(c.dir, name+".pem"), filepath.Join(c.dir, name+"-key.pem")
	os.WriteFile(cert, certPEM, 0o644)
	os.WriteFile(key, keyPEM, 0o600)
	return cert, key
}

// config is a vmhopd config for host name with certificates from c,
// listening on loopback, with peers given as name=address.
func (c *testCA) config(t *testing.T, name string, peers ...string) config.Daemon {
	cfg := config.DefaultDaemon()
	cfg.Name = name
	cfg.Listen = "127.0.0.1:0"
	state := t.TempDir()
	cfg.StateDir = filepath.Join(state, "state")
	cfg.Socket = filepath.Join(state, "run", "vmhopd.sock")
	cfg.TLS.Cert, cfg.TLS.Key = c.issue(t, name)
	cfg.TLS.CA = filepath.Join(c.dir, "ca.pem")
	for _, p := range peers {
		n, addr, _ := strings.Cut(p, "=")
		cfg.Peers = append(cfg.Peers, config.Peer{Name: n, Address: addr})
	}
	return cfg
}

// start builds a daemon, lets register add peer methods, and serves it
// until the test ends.
func start(t *testing.T, cfg config.Daemon, opts Options, register func(*PeerAPI)) *Daemon {
	t.Helper()
	if opts.Log == nil {
		opts.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	d, err := New(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	if register != nil {
		register(d.PeerAPI())
	}
	if err := d.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("serve: %v", err)
		}
	})
	return d
}

// echo is a peer method that counts its calls and says who called.
type echoReq struct{ Text string }
type echoResp struct{ Text, From string }

func registerEcho(calls *atomic.Int64) func(*PeerAPI) {
	return func(a *PeerAPI) {
		Handle(a, "echo", func(ctx context.Context, from string, r echoReq) (echoResp, error) {
			calls.Add(1)
			return echoResp{Text: r.Text, From: from}, nil
		})
		HandleStream(a, "count", func(ctx context.Context, from string, n int, send func(int) error) error {
			calls.Add(1)
			for i := 1; i <= n; i++ {
				if err := send(i); err != nil {
					return err
				}
			}
			if n > 3 {
				return Errorf(CodeInvalidArgument, "%d is more than 3", n)
			}
			return nil
		})
	}
}

// errImageExists stands for a sentinel of the migration core's.
var errImageExists = errors.New("destination image exists")

func init() { RegisterError("test_image_exists", CodeAlreadyExists, errImageExists) }

// TestSentinelCrossesTheWire: a handler's error wrapping a registered
// sentinel arrives as that sentinel (errors.Is), with its code and message.
func TestSentinelCrossesTheWire(t *testing.T) {
	ca := newTestCA(t)
	b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{}, func(a *PeerAPI) {
		Handle(a, "create-image", func(ctx context.Context, from string, path string) (Empty, error) {
			return Empty{}, fmt.Errorf("create image %q: %w", path, errImageExists)
		})
	})
	a, _ := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	c, _ := a.Peer("site-b")
	_, err := Call[string, Empty](context.Background(), c, "create-image", "/var/lib/vmhop/web1.raw")
	if !errors.Is(err, errImageExists) || CodeOf(err) != CodeAlreadyExists ||
		err.Error() != `peer "site-b": create-image: already_exists: create image "/var/lib/vmhop/web1.raw": destination image exists` {
		t.Fatalf("err = %v (is sentinel: %v, code %q)", err, errors.Is(err, errImageExists), CodeOf(err))
	}
}

// pair starts daemon site-b, which lists site-a as its peer, and returns
// site-a's config pointing at it, site-b, and site-b's handler calls.
func pair(t *testing.T, ca *testCA) (aCfg config.Daemon, b *Daemon, calls *atomic.Int64) {
	calls = new(atomic.Int64)
	b = start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{}, registerEcho(calls))
	return ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), b, calls
}

func TestPeerCallAndStream(t *testing.T) {
	ca := newTestCA(t)
	aCfg, _, calls := pair(t, ca)
	a, err := New(aCfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := a.Peer("site-b")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	h, err := c.Hello(ctx, a.hello())
	if err != nil || h.Name != "site-b" || h.Protocol != ProtocolVersion {
		t.Fatalf("hello = %+v, %v", h, err)
	}
	r, err := Call[echoReq, echoResp](ctx, c, "echo", echoReq{Text: "hi"})
	if err != nil || r != (echoResp{Text: "hi", From: "site-a"}) {
		t.Fatalf("echo = %+v, %v", r, err)
	}
	var got []int
	if err := CallStream(ctx, c, "count", 3, func(i int) error { got = append(got, i); return nil }); err != nil || fmt.Sprint(got) != "[1 2 3]" {
		t.Fatalf("count 3 = %v, %v", got, err)
	}
	got = nil
	err = CallStream(ctx, c, "count", 4, func(i int) error { got = append(got, i); return nil })
	if CodeOf(err) != CodeInvalidArgument || fmt.Sprint(got) != "[1 2 3 4]" {
		t.Fatalf("count 4 = %v, %v; want 4 events then invalid_argument", got, err)
	}
	if _, err := Call[echoReq, echoResp](ctx, c, "nosuch", echoReq{}); CodeOf(err) != CodeNotFound {
		t.Fatalf("unknown method: %v, want not_found", err)
	}
	if n := calls.Load(); n != 3 {
		t.Fatalf("handler ran %d times, want 3", n)
	}
}

// TestPeerCallCancelled: cancelling a call cancels the handler's context
// on the peer (an abort reaches the work it stops).
func TestPeerCallCancelled(t *testing.T) {
	ca := newTestCA(t)
	handlerErr := make(chan error, 1)
	b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{}, func(a *PeerAPI) {
		Handle(a, "wait", func(ctx context.Context, from string, _ Empty) (Empty, error) {
			<-ctx.Done()
			handlerErr <- ctx.Err()
			return Empty{}, ctx.Err()
		})
	})
	a, _ := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	c, _ := a.Peer("site-b")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := Call[Empty, Empty](ctx, c, "wait", Empty{}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call: %v, want the deadline", err)
	}
	select {
	case err := <-handlerErr:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("handler's context: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the handler's context was not cancelled")
	}
}

// TestPeerRefusedAtHandshake: a client with a certificate from another
// CA, with none, or with one from the right CA naming no configured peer
// is cut off in the TLS handshake; the method's handler never runs.
func TestPeerRefusedAtHandshake(t *testing.T) {
	ca := newTestCA(t)
	_, b, calls := pair(t, ca)
	other := newTestCA(t) // same name as ca's, so the client sends its certificate (RFC 8446 4.2.4)
	load := func(cert, key string) []tls.Certificate {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return []tls.Certificate{pair}
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.ca.Cert)
	tests := []struct {
		name  string
		certs []tls.Certificate
		alert string // RFC 8446 6.2
	}{
		{"certificate from another CA", load(other.issue(t, "site-a")), "unknown certificate authority"},
		{"no client certificate", nil, "certificate required"},
		{"unlisted identity", load(ca.issue(t, "site-c")), "bad certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := tls.Dial("tcp", b.PeerAddr().String(), &tls.Config{
				MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: "site-b", Certificates: tt.certs})
			if err == nil {
				// TLS 1.3: the client's side of the handshake ends before
				// the server has checked its certificate; the server's
				// alert arrives on the first read.
				fmt.Fprintf(conn, "POST /v1/peer/echo HTTP/1.1\r\nHost: site-b\r\nContent-Length: 2\r\n\r\n{}")
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			if err == nil || err.Error() != "remote error: tls: "+tt.alert {
				t.Fatalf("got %v, want the server's TLS alert %q", err, tt.alert)
			}
		})
	}
	if n := calls.Load(); n != 0 {
		t.Fatalf("handler ran %d times for refused clients", n)
	}
}

// TestPeerServerIdentityChecked: a daemon that answers at a peer's address
// with another name (same CA) is not that peer.
func TestPeerServerIdentityChecked(t *testing.T) {
	ca := newTestCA(t)
	calls := new(atomic.Int64)
	c := start(t, ca.config(t, "site-c", "site-a=127.0.0.1:1"), Options{}, registerEcho(calls))
	a, err := New(ca.config(t, "site-a", "site-b="+c.PeerAddr().String()), Options{})
	if err != nil {
		t.Fatal(err)
	}
	pc, _ := a.Peer("site-b")
	_, err = Call[echoReq, echoResp](context.Background(), pc, "echo", echoReq{})
	var host x509.HostnameError
	if !errors.As(err, &host) || calls.Load() != 0 {
		t.Fatalf("err = %v (calls %d), want a certificate name mismatch", err, calls.Load())
	}
}

func TestHelloChecksNameAndProtocol(t *testing.T) {
	ca := newTestCA(t)
	aCfg, _, _ := pair(t, ca)
	a, _ := New(aCfg, Options{})
	c, _ := a.Peer("site-b")
	ctx := context.Background()
	_, err := Call[Hello, Hello](ctx, c, "hello", Hello{Name: "site-x", Protocol: ProtocolVersion})
	if CodeOf(err) != CodePermissionDenied {
		t.Errorf("hello naming another host: %v, want permission_denied", err)
	}
	_, err = Call[Hello, Hello](ctx, c, "hello", Hello{Name: "site-a", Protocol: ProtocolVersion + 1, Version: "v9"})
	if CodeOf(err) != CodeFailedPrecondition || !strings.Contains(err.Error(), fmt.Sprintf("protocol %d (vmhopd v9)", ProtocolVersion+1)) {
		t.Errorf("hello with another protocol: %v, want failed_precondition naming both", err)
	}
	// Every call carries the protocol version: one without it is refused.
	req, _ := c.request(ctx, "hello", Hello{Name: "site-a", Protocol: ProtocolVersion})
	req.Header.Set(protocolHeader, "0")
	if err := do(c.hc, req, nil); CodeOf(err) != CodeFailedPrecondition || !strings.Contains(err.Error(), `speaks protocol "0"`) {
		t.Errorf("call with protocol 0: %v, want failed_precondition", err)
	}
}

func TestNewNamesTheKeyAtFault(t *testing.T) {
	ca := newTestCA(t)
	cfg := ca.config(t, "site-a")
	cfg.Name = "site-z" // not the certificate's name
	if _, err := New(cfg, Options{}); err == nil || !strings.HasPrefix(err.Error(), "vmhopd.tls.cert: ") {
		t.Errorf("wrong name: %v", err)
	}
	cfg = ca.config(t, "site-a")
	cfg.TLS.CA = filepath.Join(newTestCA(t).dir, "ca.pem")
	if _, err := New(cfg, Options{}); err == nil || !strings.Contains(err.Error(), "vmhopd.tls.cert: ") {
		t.Errorf("other CA: %v", err)
	}
	cfg = ca.config(t, "site-a")
	cfg.TLS.CA = "/nonexistent/ca.pem"
	if _, err := New(cfg, Options{}); err == nil || !strings.HasPrefix(err.Error(), "vmhopd.tls.ca: ") {
		t.Errorf("missing CA: %v", err)
	}
	cfg = ca.config(t, "site-a")
	cfg.Listen = "127.0.0.1:99999"
	d, _ := New(cfg, Options{})
	if err := d.Listen(); err == nil || !strings.HasPrefix(err.Error(), "vmhopd.listen: ") {
		t.Errorf("bad listen: %v", err)
	}
}

func TestSecretHandover(t *testing.T) {
	ca := newTestCA(t)
	aCfg, b, _ := pair(t, ca)
	a, _ := New(aCfg, Options{})
	ctx := context.Background()
	const id = "web1-0011aabb"
	val, err := a.HandOverSecret(ctx, "site-b", id, "qemu-psk", 32)
	if err != nil || len(val) != 32 {
		t.Fatalf("hand over: %d bytes, %v", len(val), err)
	}
	for _, d := range []*Daemon{a, b} {
		path := filepath.Join(d.cfg.StateDir, "migrations", id, "qemu-psk")
		got, err := os.ReadFile(path)
		if err != nil || string(got) != string(val) {
			t.Fatalf("%s: %q = %x, %v; want %x", d.cfg.Name, path, got, err, val)
		}
		fi, _ := os.Stat(path)
		di, _ := os.Stat(filepath.Dir(path))
		if fi.Mode() != 0o600 || di.Mode() != os.ModeDir|0o700 {
			t.Errorf("%s: file mode %v, directory mode %v; want -rw------- and drwx------", d.cfg.Name, fi.Mode(), di.Mode())
		}
	}
	if _, err := a.HandOverSecret(ctx, "site-b", id, "qemu-psk", 32); CodeOf(err) != CodeAlreadyExists {
		t.Errorf("second hand-over of one secret: %v, want already_exists", err)
	}
	// Another host may neither add to nor remove site-a's migration on site-b.
	if err := b.Secrets().Put(id, "site-c", "x", []byte("x")); CodeOf(err) != CodePermissionDenied {
		t.Errorf("put into another owner's migration: %v", err)
	}
	if err := b.Secrets().Remove(id, "site-c"); CodeOf(err) != CodePermissionDenied {
		t.Errorf("remove another owner's migration: %v", err)
	}
	if err := b.Secrets().Put("../x", "site-a", "x", nil); CodeOf(err) != CodeInvalidArgument {
		t.Errorf("path in a migration id: %v", err)
	}
	if err := a.ForgetSecrets(ctx, "site-b", id); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*Daemon{a, b} {
		if _, err := os.Stat(filepath.Join(d.cfg.StateDir, "migrations", id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: migration directory left after forget: %v", d.cfg.Name, err)
		}
	}
	if err := a.ForgetSecrets(ctx, "site-b", id); err != nil {
		t.Errorf("forget twice: %v", err)
	}
}

// TestStartSweepsLeftSecrets: secrets a dead vmhopd left are removed when
// the next one starts; a daemon that only checks its config (-check) keeps them.
func TestStartSweepsLeftSecrets(t *testing.T) {
	ca := newTestCA(t)
	cfg := ca.config(t, "site-b", "site-a=127.0.0.1:1")
	left := filepath.Join(cfg.StateDir, "migrations", "web1-0badc0de")
	os.MkdirAll(left, 0o700)
	os.WriteFile(filepath.Join(left, "qemu-psk"), []byte("secret"), 0o600)
	if _, err := New(cfg, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(left); err != nil {
		t.Fatalf("New (as -check) removed secrets: %v", err)
	}
	start(t, cfg, Options{}, nil)
	if _, err := os.Stat(left); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("secrets left by a dead vmhopd survive its successor: %v", err)
	}
}

func TestLocalStatusAndPeers(t *testing.T) {
	ca := newTestCA(t)
	aCfg, _, _ := pair(t, ca)
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := dead.Addr().String()
	dead.Close()
	aCfg.Peers = append(aCfg.Peers, config.Peer{Name: "site-c", Address: deadAddr},
		config.Peer{Name: "site-x", Address: aCfg.Peers[0].Address}) // site-b answers there

	a := start(t, aCfg, Options{}, nil)
	lc := NewLocalClient(aCfg.Socket)
	ctx := context.Background()
	st, err := lc.Status(ctx)
	if err != nil || st.Name != "site-a" || st.Listen != a.PeerAddr().String() || fmt.Sprint(st.Peers) != "[site-b site-c site-x]" {
		t.Fatalf("status = %+v, %v", st, err)
	}
	ps, err := lc.Peers(ctx)
	if err != nil || len(ps) != 3 {
		t.Fatalf("peers = %+v, %v", ps, err)
	}
	if p := ps[0]; p.Name != "site-b" || !p.Reachable || !p.Authenticated || p.Protocol != ProtocolVersion || p.Error != "" {
		t.Errorf("site-b: %+v", p)
	}
	if p := ps[1]; p.Name != "site-c" || p.Reachable || p.Authenticated || !strings.Contains(p.Error, "connection refused") {
		t.Errorf("site-c: %+v", p)
	}
	if p := ps[2]; p.Name != "site-x" || !p.Reachable || p.Authenticated || !strings.Contains(p.Error, "certificate is valid for site-b, not site-x") {
		t.Errorf("site-x: %+v", p)
	}
	var resp *http.Response
	resp, err = lc.hc.Get("http://vmhopd/localapi/v0/nosuch")
	if err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown verb: %v %v", resp, err)
	}
}

// TestStreamTLS: a data stream between two peers authenticates both hosts;
// a third host's certificate from the same CA is refused by the server.
func TestStreamTLS(t *testing.T) {
	ca := newTestCA(t)
	a, err := New(ca.config(t, "site-a", "site-b=127.0.0.1:1"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := New(ca.config(t, "site-b", "site-a=127.0.0.1:1", "site-c=127.0.0.1:1"), Options{})
	c, _ := New(ca.config(t, "site-c", "site-b=127.0.0.1:1"), Options{})
	srv, _, err := b.StreamTLS("site-a") // site B serves the stream for site A only
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 2)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			b := make([]byte, 5)
			if _, err := io.ReadFull(conn, b); err != nil {
				got <- "refused: " + err.Error()
			} else {
				got <- string(b)
			}
			conn.Close()
		}
	}()
	dial := func(d *Daemon) error {
		_, cl, err := d.StreamTLS("site-b")
		if err != nil {
			t.Fatal(err)
		}
		conn, err := tls.Dial("tcp", ln.Addr().String(), cl)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.Write([]byte("chunk"))
		_, err = conn.Read(make([]byte, 1))
		return err
	}
	if err := dial(a); err != io.EOF {
		t.Fatalf("site-a: %v, want the server's close after reading", err)
	}
	if s := <-got; s != "chunk" {
		t.Fatalf("server read %q", s)
	}
	if err := dial(c); err == nil || err.Error() != "remote error: tls: bad certificate" {
		t.Fatalf("site-c: %v, want refused", err)
	}
	if s := <-got; !strings.HasPrefix(s, "refused: ") {
		t.Fatalf("server read %q from site-c", s)
	}
	if _, _, err := a.StreamTLS("site-x"); CodeOf(err) != CodeNotFound {
		t.Fatalf("stream with an unlisted peer: %v", err)
	}
}
