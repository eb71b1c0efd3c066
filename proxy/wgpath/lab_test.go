package wgpath

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
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
)

// The lab tests of the packet path, with the lab's stand-in VM (a
// namespace behind a veth, moved from site A to site B by moving the
// veth): fast, and exact about bytes.

func data(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func sum(b []byte) string { h := sha256.Sum256(b); return hex.EncodeToString(h[:]) }

// serveVM runs, inside the stand-in VM: 9000 upload (replies with the
// sha256 of what it read and who sent it), 9001 download (the payload,
// paced at ~2 MB/s), 9002 echo.
func serveVM(t *testing.T, ns string, payload []byte) {
	t.Helper()
	handlers := []func(net.Conn){
		func(c net.Conn) {
			h := sha256.New()
			io.Copy(h, c)
			fmt.Fprintf(c, "%x %s\n", h.Sum(nil), c.RemoteAddr())
		},
		func(c net.Conn) {
			for off := 0; off < len(payload); off += 64 << 10 {
				if _, err := c.Write(payload[off:min(off+64<<10, len(payload))]); err != nil {
					return
				}
				time.Sleep(32 * time.Millisecond)
			}
		},
		func(c net.Conn) { io.Copy(c, c) },
	}
	for i, port := range []string{":9000", ":9001", ":9002"} {
		ln, err := netns.Listen(ns, "tcp", port)
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
				go func() { defer c.Close(); handlers[i](c) }()
			}
		}()
	}
}

func echo(c net.Conn, msg string) error {
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

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestContinuityAcrossMove: with userspace continuity on both hosts (no
// BPF anywhere), connections made to the VM's old address before it
// moved keep working after it moved to site B, bulk transfers both ways
// with full-size packets in flight included (the tunnel's MTU is 80
// bytes under the links': path MTU discovery and the MSS clamp carry
// them); new connections to the old address reach it through the
// tunnel; the new address works both ways (NAT); the VM's own new
// connection leaves from new_ip. Then everything is removed and neither
// host keeps anything.
func TestContinuityAcrossMove(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartNSVM(ctx)
	must(t, err)
	payload := data(8 << 20)
	serveVM(t, vm.NS, payload)

	a := New(Options{Netns: l.NS(lab.SiteA), LocalIP: lab.HostA})
	b := New(Options{Netns: l.NS(lab.SiteB), LocalIP: lab.HostB})
	t.Cleanup(func() { a.Close(); b.Close() })
	const token = 0x0123456789abcdef
	// The migrator's order: B's end first, then A's with B as its peer,
	// then B's VM entry with A as its peer (its keepalive starts the
	// handshake).
	keyB, portB, err := b.OpenTunnel(token)
	must(t, err)
	keyA, portA, err := a.OpenTunnel(token)
	must(t, err)
	must(t, a.SetPeer(token, Peer{Key: keyB, Endpoint: netip.AddrPortFrom(lab.HostB, portB),
		Allowed: []netip.Prefix{netip.PrefixFrom(lab.OldIP, 32)}}))
	must(t, a.SetRedirect(lab.OldIP, token, vm.MAC, false))
	// B knows A (AttachVM in the migrator, long before the switch): its
	// keepalive makes the handshake.
	must(t, b.SetPeer(token, Peer{Key: keyA, Endpoint: netip.AddrPortFrom(lab.HostA, portA),
		Allowed: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, Keepalive: 25 * time.Second}))
	waitHandshake(t, a, token)

	old := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(lab.OldIP, port) }
	ec, err := l.DialTCP(ctx, lab.Client, old(9002))
	must(t, err)
	defer ec.Close()
	must(t, echo(ec, "before"))
	up, err := l.DialTCP(ctx, lab.Client, old(9000))
	must(t, err)
	down, err := l.DialTCP(ctx, lab.Client, old(9001))
	must(t, err)
	upDone := make(chan error, 1)
	go func() {
		for off := 0; off < len(payload); off += 64 << 10 {
			if _, err := up.Write(payload[off:min(off+64<<10, len(payload))]); err != nil {
				upDone <- err
				return
			}
			time.Sleep(32 * time.Millisecond)
		}
		up.(*net.TCPConn).CloseWrite()
		upDone <- nil
	}()
	downDone := make(chan []byte, 1)
	go func() {
		down.SetDeadline(time.Now().Add(90 * time.Second))
		b, _ := io.ReadAll(down)
		downDone <- b
	}()
	time.Sleep(1500 * time.Millisecond)

	must(t, l.UnplugNSVM(ctx, vm))
	switchAt := time.Now()
	_, err = l.PlugNSVM(ctx, vm)
	must(t, err)
	gwMAC, err := l.RouterMAC(lab.SiteA)
	must(t, err)
	must(t, b.SetVM(VM{OldIP: lab.OldIP, NewIP: lab.NewIP, GatewayMAC: gwMAC, MAC: vm.MAC, Tap: vm.Tap, Token: token}))
	must(t, a.SetRedirect(lab.OldIP, token, vm.MAC, true))
	t.Logf("switched in %s", time.Since(switchAt).Round(time.Microsecond))

	must(t, echo(ec, "after the move"))
	must(t, <-upDone)
	up.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := io.ReadAll(up)
	must(t, err)
	if !strings.HasPrefix(string(line), sum(payload)+" "+lab.ClientIP.String()+":") {
		t.Errorf("upload across the move: server saw %q, want sha %s from the client", line, sum(payload)[:12])
	}
	if got := <-downDone; !bytes.Equal(got, payload) {
		t.Errorf("download across the move: %d bytes, sha %s, want %d bytes sha %s", len(got), sum(got)[:12], len(payload), sum(payload)[:12])
	}

	// The router forgets the old address's MAC: host A answers ARP for it.
	netns.Run(ctx, l.NS(lab.WAN), "ip", "neigh", "flush", lab.OldIP.String())
	nc, err := l.DialTCP(ctx, lab.Client, old(9002))
	must(t, err)
	must(t, echo(nc, "new connection to the old address"))
	nc.Close()

	// The new address, both ways: the client sees new_ip as its peer, the
	// VM sees the client's own address.
	nu, err := l.DialTCP(ctx, lab.Client, netip.AddrPortFrom(lab.NewIP, 9000))
	must(t, err)
	if ra := nu.RemoteAddr().(*net.TCPAddr); !ra.IP.Equal(net.IP(lab.NewIP.AsSlice())) {
		t.Errorf("client's peer %s, want %s", ra, lab.NewIP)
	}
	nu.Write([]byte("hello"))
	nu.(*net.TCPConn).CloseWrite()
	nu.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, _ = io.ReadAll(nu)
	nu.Close()
	if !strings.HasPrefix(string(line), sum([]byte("hello"))+" "+lab.ClientIP.String()+":") {
		t.Errorf("via new ip: %q", line)
	}
	// The VM's own new connection leaves from new_ip.
	seen := make(chan string, 1)
	ln, err := netns.Listen(l.NS(lab.Client), "tcp", ":9100")
	must(t, err)
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			seen <- c.RemoteAddr().(*net.TCPAddr).IP.String()
			c.Close()
		}
	}()
	must(t, netns.Do(vm.NS, func() error {
		c, err := net.DialTimeout("tcp", lab.ClientIP.String()+":9100", 5*time.Second)
		if err == nil {
			time.Sleep(200 * time.Millisecond)
			c.Close()
		}
		return err
	}))
	select {
	case ip := <-seen:
		if ip != lab.NewIP.String() {
			t.Errorf("VM's outbound connection arrived from %s, want %s", ip, lab.NewIP)
		}
	case <-time.After(5 * time.Second):
		t.Error("VM's outbound connection never arrived")
	}
	c, idle, any, err := a.RedirectStats(lab.OldIP)
	must(t, err)
	t.Logf("host A: %v, last packet into the tunnel %s ago", c, idle.Round(time.Millisecond))
	if !any || c["encap_packets"] == 0 || c["decap_packets"] == 0 {
		t.Errorf("host A's tunnel carried nothing: %v", c)
	}

	// The drain's order, then the VM entry: nothing is left.
	must(t, a.RemoveRedirect(lab.OldIP))
	must(t, b.SetVM(VM{OldIP: lab.OldIP, NewIP: lab.NewIP, GatewayMAC: gwMAC, MAC: vm.MAC, Tap: vm.Tap}))
	must(t, a.CloseTunnel(token))
	must(t, b.CloseTunnel(token))
	nu, err = l.DialTCP(ctx, lab.Client, netip.AddrPortFrom(lab.NewIP, 9002))
	must(t, err)
	must(t, echo(nu, "new address after the drain"))
	nu.Close()
	must(t, b.RemoveVM(lab.OldIP, lab.NewIP))
	assertClean(t, l.NS(lab.SiteA))
	assertClean(t, l.NS(lab.SiteB))
}
