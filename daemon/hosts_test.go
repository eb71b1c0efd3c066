package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

// hostsPair starts site-b serving the destination host's methods (a
// migrator.Host with no datapath: images only, no root needed, and a
// LocalDiskServer) and returns site-a's client to it.
func hostsPair(t *testing.T, more ...func(*PeerAPI)) *PeerClient {
	t.Helper()
	ca := newTestCA(t)
	b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{}, func(a *PeerAPI) {
		ServeDestination(a, &migrator.Host{Name: "site-b"})
		ServeDiskServer(a, &storage.LocalDiskServer{})
		for _, f := range more {
			f(a)
		}
	})
	a, err := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := a.Peer("site-b")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestDestinationOverPeerAPI: the migration core's destination calls
// cross the peer API: the image is made on site-b (an existing one is
// refused as migrator.ErrImageExists on site-a's side), hashed there with
// the digest the source's own hashing gives, and removed by Abort; a
// call that fails there says why here.
func TestDestinationOverPeerAPI(t *testing.T) {
	dest := RemoteDestination{Peer: hostsPair(t)}
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "web1.raw")
	if err := dest.CreateImage(ctx, migrator.ImageCreate{Path: img, Size: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(img); err != nil || st.Size() != 4<<20 {
		t.Fatalf("image on site-b: %v, %v", st, err)
	}
	err := dest.CreateImage(ctx, migrator.ImageCreate{Path: img, Size: 4 << 20})
	if !errors.Is(err, migrator.ErrImageExists) || CodeOf(err) != CodeAlreadyExists {
		t.Fatalf("second create: %v", err)
	}
	data := make([]byte, 1<<20)
	rand.Read(data)
	f, _ := os.OpenFile(img, os.O_WRONLY, 0)
	f.WriteAt(data, 2<<20)
	f.Close()
	d, err := dest.HashImage(ctx, migrator.HashRequest{Path: img, Whole: true})
	if err != nil {
		t.Fatal(err)
	}
	local, err := storage.HashImage(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(d.Root, local.Root()) || d.Read != 1<<20 {
		t.Fatalf("digest over the peer API %x (read %d), local %x", d.Root, d.Read, local.Root())
	}
	if err := dest.AttachVM(ctx, migrator.VMAttach{Tap: "tap-web1", MAC: "52:54:00:12:34:56", GatewayMAC: "52:54:00:00:00:01"}); err == nil ||
		!strings.Contains(err.Error(), "datapath not loaded") {
		t.Fatalf("attach without a datapath: %v", err)
	}
	if held, err := dest.HeldAddrs(ctx, migrator.AddrQuery{}); err != nil || held.Name != "site-b" || len(held.Addrs) == 0 {
		t.Fatalf("held addresses over the peer API: %+v, %v", held, err)
	}
	if err := dest.Abort(ctx, migrator.DestAbort{Image: img}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("image after abort: %v", err)
	}
}

// TestChunkedEngineOverPeerAPI: the chunked engine's rounds go to a
// destination end that site-b's daemon started on request (the identity
// handed over inside it); the image arrives byte for byte.
func TestChunkedEngineOverPeerAPI(t *testing.T) {
	c := hostsPair(t)
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "a.raw"), filepath.Join(dir, "b.raw")
	data := make([]byte, 8<<20)
	rand.Read(data[1<<20 : 5<<20])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var d net.Dialer
	s := &storage.ChunkedSync{
		Source: storage.ChunkedSource{Path: src, Chunk: storage.DigestChunk}, Dest: storage.ChunkedDest{Path: dst},
		DialSource: d.DialContext, DestWAN: addr, Server: RemoteDiskServer{Peer: c}, MaxRounds: 1,
	}
	ctx := context.Background()
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Converge(ctx, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Final(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, data) {
		t.Fatal("the image at site-b differs")
	}
	if _, err := net.Dial("tcp", addr); err == nil {
		t.Fatal("site-b still listens after StopChunked")
	}
}

// fakeIncoming is a destination QEMU half: it records what it was asked
// and "exits" when told.
type fakeIncoming struct {
	mu      sync.Mutex
	started qemu.IncomingStart
	calls   []string
	exited  chan struct{}
}

func (f *fakeIncoming) note(s string) { f.mu.Lock(); f.calls = append(f.calls, s); f.mu.Unlock() }

func (f *fakeIncoming) Start(_ context.Context, req qemu.IncomingStart) error {
	f.note("start")
	f.mu.Lock()
	f.started = req
	f.mu.Unlock()
	return nil
}

func (f *fakeIncoming) Query(_ context.Context, req qemu.Query) (json.RawMessage, error) {
	f.note(req.Command)
	return json.RawMessage(`{"qemu":{"major":7,"minor":2,"micro":22},"package":""}`), nil
}

func (f *fakeIncoming) ExportDisk(context.Context, qemu.DiskExport) error {
	f.note("export")
	return nil
}
func (f *fakeIncoming) UnexportDisk(context.Context) error { f.note("unexport"); return nil }
func (f *fakeIncoming) WaitRunning(context.Context, qemu.RunningWait) error {
	f.note("wait-running")
	return errors.New("destination not running (state \"inmigrate\")")
}
func (f *fakeIncoming) Stop(context.Context) error { f.note("stop"); return nil }
func (f *fakeIncoming) Exited() <-chan struct{}    { return f.exited }

// TestIncomingOverPeerAPI: the QEMU driver's destination half crosses the
// peer API: the start request with its PSK, a query's raw result, an
// error with its message; and Exited closes on the source's side when
// the destination's QEMU exits.
func TestIncomingOverPeerAPI(t *testing.T) {
	fake := &fakeIncoming{exited: make(chan struct{})}
	in := &RemoteIncoming{Peer: hostsPair(t, func(a *PeerAPI) { ServeIncoming(a, fake) })}
	ctx := context.Background()
	if in.Exited() != nil {
		t.Fatal("exited before start")
	}
	req := qemu.IncomingStart{Name: "vm-siteB", Program: "qemu-system-x86_64", Args: []string{"-incoming", "defer"},
		QMPSocket: "/run/vmhop/vm.qmp", Listen: netip.MustParseAddrPort("10.2.0.2:4444"),
		PSK: &qemu.PSKSecret{Username: "vmhop", KeyHex: strings.Repeat("ab", 32), Dir: "/run/vmhop/tls-b"}}
	if err := in.Start(ctx, req); err != nil {
		t.Fatal(err)
	}
	raw, err := in.Query(ctx, qemu.Query{Command: "query-version"})
	if err != nil || !strings.Contains(string(raw), `"major":7`) {
		t.Fatalf("query: %s, %v", raw, err)
	}
	if err := in.ExportDisk(ctx, qemu.DiskExport{Node: "disk0"}); err != nil {
		t.Fatal(err)
	}
	if err := in.WaitRunning(ctx, qemu.RunningWait{Timeout: time.Second}); err == nil || !strings.Contains(err.Error(), `state "inmigrate"`) {
		t.Fatalf("wait running: %v", err)
	}
	fake.mu.Lock()
	started := fake.started
	fake.mu.Unlock()
	if started.PSK == nil || *started.PSK != *req.PSK || started.Listen != req.Listen || strings.Join(started.Args, " ") != "-incoming defer" {
		t.Fatalf("start request on site-b: %+v", started)
	}
	select {
	case <-in.Exited():
		t.Fatal("exited while the destination runs")
	case <-time.After(100 * time.Millisecond):
	}
	close(fake.exited) // the destination QEMU dies
	select {
	case <-in.Exited():
	case <-time.After(5 * time.Second):
		t.Fatal("the source did not learn that the destination QEMU exited")
	}
	if err := in.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	fake.mu.Lock()
	defer fake.mu.Unlock()
	if got := strings.Join(fake.calls, " "); got != "start query-version export wait-running stop" {
		t.Fatalf("calls on site-b: %s", got)
	}
}

// TestIncomingWatchEndsWithThePeer: when the destination's daemon goes
// away, Exited closes on the source's side: the migration sees the
// destination lost instead of waiting on it.
func TestIncomingWatchEndsWithThePeer(t *testing.T) {
	ca := newTestCA(t)
	fake := &fakeIncoming{exited: make(chan struct{})}
	b, err := New(ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ServeIncoming(b.PeerAPI(), fake)
	if err := b.Listen(); err != nil {
		t.Fatal(err)
	}
	bctx, stopB := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- b.Serve(bctx) }()
	defer func() { stopB(); <-served }()
	a, err := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, _ := a.Peer("site-b")
	in := &RemoteIncoming{Peer: c}
	if err := in.Start(context.Background(), qemu.IncomingStart{Name: "vm"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the watch is open
	stopB()                            // site-b's daemon stops; its QEMU "runs" on
	select {
	case <-in.Exited():
	case <-time.After(10 * time.Second):
		t.Fatal("Exited did not close when the destination's daemon went away")
	}
}

// TestChunkedEngineWithHostIdentities: with host TLS, each end of a disk
// stream proves its own host identity: site-b serves with its peer
// API's certificate and admits site-a's; a site-a certificate from
// another CA is refused in the handshake and nothing is written.
func TestChunkedEngineWithHostIdentities(t *testing.T) {
	ca := newTestCA(t)
	ds := &storage.LocalDiskServer{}
	b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{}, func(a *PeerAPI) {
		ServeDiskServer(a, ds)
	})
	ds.TLS = b.HostServerTLS()
	a, err := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, err := a.Peer("site-b")
	if err != nil {
		t.Fatal(err)
	}
	_, clientTLS, err := a.StreamTLS("site-b")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "a.raw")
	data := make([]byte, 4<<20)
	rand.Read(data[1<<20 : 3<<20])
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	sync := func(dst string, tlsc *tls.Config) error {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		var d net.Dialer
		s := &storage.ChunkedSync{
			Source: storage.ChunkedSource{Path: src, Chunk: storage.DigestChunk}, Dest: storage.ChunkedDest{Path: dst},
			DialSource: d.DialContext, DestWAN: addr, Server: RemoteDiskServer{Peer: c}, TLS: tlsc, MaxRounds: 1,
			Stall: 2 * time.Second,
		}
		ctx := context.Background()
		if err := s.Start(ctx); err != nil {
			return err
		}
		defer s.Close()
		if err := s.Converge(ctx, nil); err != nil {
			return err
		}
		_, err = s.Final(ctx)
		return err
	}
	good := filepath.Join(dir, "b.raw")
	if err := sync(good, clientTLS); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(good); !bytes.Equal(got, data) {
		t.Fatal("the image at site-b differs")
	}
	// site-a's name, another CA's signature.
	other := newTestCA(t)
	impostor, err := New(other.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, badTLS, err := impostor.StreamTLS("site-b")
	if err != nil {
		t.Fatal(err)
	}
	badTLS.RootCAs = clientTLS.RootCAs // it trusts site-b: only its own certificate is wrong
	bad := filepath.Join(dir, "c.raw")
	if err := sync(bad, badTLS); err == nil {
		t.Fatal("a client certificate from another CA was admitted to the disk stream")
	}
	if st, err := os.Stat(bad); err == nil && st.Size() > 0 {
		if got, _ := os.ReadFile(bad); bytes.Contains(got, data[1<<20:1<<20+4096]) {
			t.Error("data reached site-b's image through a refused stream")
		}
	}
}
