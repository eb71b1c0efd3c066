package labtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/netns"
)

// The services the packet-path tests (proxy/datapath, proxy/wgpath) run in
// the lab's stand-in VM (lab.StartNSVM), and what their clients check.

// Ports of ServeNSVM's services.
const (
	UploadPort   = 9000 // reads to EOF, replies "<sha256 hex> <client addr:port>\n"
	DownloadPort = 9001 // sends the payload in 64 KiB writes every 32 ms (~2 MB/s)
	EchoPort     = 9002 // echoes what it reads
)

// Payload returns n deterministic pseudo-random bytes (the same for every n
// prefix: a fixed seed).
func Payload(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// SHA256 is b's SHA-256 in hex, as the upload service replies it.
func SHA256(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }

// ServeNSVM runs the upload, download and echo services inside namespace
// ns until t ends; download sends payload.
func ServeNSVM(t testing.TB, ns string, payload []byte) {
	t.Helper()
	handlers := map[int]func(net.Conn){
		UploadPort: func(c net.Conn) {
			h := sha256.New()
			io.Copy(h, c)
			fmt.Fprintf(c, "%x %s\n", h.Sum(nil), c.RemoteAddr())
		},
		DownloadPort: func(c net.Conn) {
			for off := 0; off < len(payload); off += 64 << 10 {
				if _, err := c.Write(payload[off:min(off+64<<10, len(payload))]); err != nil {
					return
				}
				time.Sleep(32 * time.Millisecond)
			}
		},
		EchoPort: func(c net.Conn) { io.Copy(c, c) },
	}
	for port, handle := range handlers {
		ln, err := netns.Listen(ns, "tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); handle(c) }()
			}
		}()
	}
}

// Echo sends msg and a newline on c (an EchoPort connection) and checks the
// same line comes back within 5 seconds.
func Echo(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg)+1)
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != msg+"\n" {
		return fmt.Errorf("echo: got %q", got)
	}
	return nil
}

// Transfers are the connections a packet-path test has in flight across
// the stand-in VM's move: an echo connection, an upload and a paced
// download of the payload, all to the VM's old address.
type Transfers struct {
	payload  []byte
	echo, up net.Conn
	upDone   chan error
	downDone chan []byte
	downErr  error // the download's read error (set before downDone)
}

// StartTransfers opens the transfers from the lab's client to ServeNSVM's
// services at old_ip (the echo answered once) and keeps the upload and the
// download running for the test to move the VM under them; the download
// gives up after timeout.
func StartTransfers(t testing.TB, l *lab.Lab, payload []byte, timeout time.Duration) *Transfers {
	t.Helper()
	ctx := context.Background()
	old := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(lab.OldIP, port) }
	tr := &Transfers{payload: payload, upDone: make(chan error, 1), downDone: make(chan []byte, 1)}
	var err error
	if tr.echo, err = l.DialTCP(ctx, lab.Client, old(EchoPort)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.echo.Close() })
	if err := Echo(tr.echo, "before"); err != nil {
		t.Fatal(err)
	}
	if tr.up, err = l.DialTCP(ctx, lab.Client, old(UploadPort)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.up.Close() })
	down, err := l.DialTCP(ctx, lab.Client, old(DownloadPort))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { down.Close() })
	go func() {
		for off := 0; off < len(payload); off += 64 << 10 {
			if _, err := tr.up.Write(payload[off:min(off+64<<10, len(payload))]); err != nil {
				tr.upDone <- err
				return
			}
			time.Sleep(32 * time.Millisecond)
		}
		tr.up.(*net.TCPConn).CloseWrite()
		tr.upDone <- nil
	}()
	go func() {
		down.SetDeadline(time.Now().Add(timeout))
		b, err := io.ReadAll(down)
		tr.downErr = err
		tr.downDone <- b
	}()
	return tr
}

// Check asserts, after the move, that the echo connection still answers
// and both transfers completed byte for byte (the VM's upload service saw
// the payload's digest from the client's own address).
func (tr *Transfers) Check(t testing.TB) {
	t.Helper()
	if err := Echo(tr.echo, "after the move"); err != nil {
		t.Fatal(err)
	}
	if err := <-tr.upDone; err != nil {
		t.Fatal(err)
	}
	tr.up.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := io.ReadAll(tr.up)
	if err != nil {
		t.Fatal(err)
	}
	if want := SHA256(tr.payload) + " " + lab.ClientIP.String() + ":"; !strings.HasPrefix(string(line), want) {
		t.Errorf("upload across the move: server saw %q, want sha %s from the client", line, SHA256(tr.payload)[:12])
	}
	if got := <-tr.downDone; !bytes.Equal(got, tr.payload) {
		t.Errorf("download across the move: %d bytes, sha %s, want %d bytes sha %s (read: %v)",
			len(got), SHA256(got)[:12], len(tr.payload), SHA256(tr.payload)[:12], tr.downErr)
	}
}

// CheckAddressesAfterMove asserts what clients and the VM see once it has
// moved to site B: once the router forgot old_ip's MAC (flushed here), a
// new connection to old_ip reaches the VM (through host A); a connection
// to new_ip shows new_ip to the client and the client's own address to
// the VM; and the VM's own new connection arrives from new_ip.
func CheckAddressesAfterMove(t testing.TB, l *lab.Lab, vm *lab.NSVM) {
	t.Helper()
	ctx := context.Background()
	netns.Run(ctx, l.NS(lab.WAN), "ip", "neigh", "flush", lab.OldIP.String())
	nc, err := l.DialTCP(ctx, lab.Client, netip.AddrPortFrom(lab.OldIP, EchoPort))
	if err != nil {
		t.Fatal(err)
	}
	err = Echo(nc, "new connection to the old address")
	nc.Close()
	if err != nil {
		t.Fatal(err)
	}

	nu, err := l.DialTCP(ctx, lab.Client, netip.AddrPortFrom(lab.NewIP, UploadPort))
	if err != nil {
		t.Fatal(err)
	}
	if ra := nu.RemoteAddr().(*net.TCPAddr); !ra.IP.Equal(net.IP(lab.NewIP.AsSlice())) {
		t.Errorf("client's peer %s, want %s", ra, lab.NewIP)
	}
	nu.Write([]byte("hello"))
	nu.(*net.TCPConn).CloseWrite()
	nu.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, _ := io.ReadAll(nu)
	nu.Close()
	if !strings.HasPrefix(string(line), SHA256([]byte("hello"))+" "+lab.ClientIP.String()+":") {
		t.Errorf("via new ip: %q", line)
	}

	seen := make(chan string, 1)
	ln, err := netns.Listen(l.NS(lab.Client), "tcp", ":9100")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			seen <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	err = netns.Do(vm.NS, func() error {
		c, err := net.DialTimeout("tcp", lab.ClientIP.String()+":9100", 5*time.Second)
		if err == nil {
			time.Sleep(200 * time.Millisecond)
			c.Close()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ip := <-seen:
		if ip != lab.NewIP.String() {
			t.Errorf("VM's outbound connection arrived from %s, want %s", ip, lab.NewIP)
		}
	case <-time.After(5 * time.Second):
		t.Error("VM's outbound connection never arrived")
	}
}
