package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/storage"
)

// hostsPair starts site-b serving the destination host's methods (a
// migrator.Host with no datapath: images only, no root needed, and a
// LocalDiskServer) and returns site-a's client to it.
func hostsPair(t *testing.T) *PeerClient {
	t.Helper()
	ca := newTestCA(t)
	b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{}, func(a *PeerAPI) {
		ServeDestination(a, &migrator.Host{Name: "site-b"})
		ServeDiskServer(a, &storage.LocalDiskServer{})
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
