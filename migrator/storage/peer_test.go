package storage

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net"
	"testing"
	"time"
)

// TestIdentityCrossesAsJSON: the per-migration identity made on one host
// and handed to the other as JSON lets the two ends of a stream
// authenticate each other; an end holding another identity is refused.
func TestIdentityCrossesAsJSON(t *testing.T) {
	made, err := newPeerTLS()
	if err != nil {
		t.Fatal(err)
	}
	id, err := made.identity()
	if err != nil {
		t.Fatal(err)
	}
	j, err := json.Marshal(ChunkedServe{Listen: "10.2.0.2:10811", Path: "/x.raw", Identity: id, Stall: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var req ChunkedServe
	if err := json.Unmarshal(j, &req); err != nil {
		t.Fatal(err)
	}
	held, err := req.Identity.peerTLS()
	if err != nil {
		t.Fatal(err)
	}
	other, _ := newPeerTLS()
	handshake := func(server, client *peerTLS) (error, error) {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv := tls.Server(a, server.server())
		errc := make(chan error, 1)
		go func() { errc <- srv.HandshakeContext(ctx); a.Close() }()
		cerr := tls.Client(b, client.client()).HandshakeContext(ctx)
		b.Close()
		return <-errc, cerr
	}
	if serr, cerr := handshake(held, made); serr != nil || cerr != nil {
		t.Fatalf("handover identity: server %v, client %v", serr, cerr)
	}
	if serr, _ := handshake(held, other); serr == nil {
		t.Fatal("a client with another identity was accepted")
	}
	if _, err := (Identity{}).peerTLS(); err == nil {
		t.Fatal("an empty identity was accepted")
	}
}
