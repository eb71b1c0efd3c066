package wgpath

import (
	"bytes"
	"context"
	"encoding/hex"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
)

func TestMain(m *testing.M) {
	lab.RunChild()
	os.Exit(m.Run())
}

// RFC 7748 section 6.1: Alice's private and public keys.
func TestKeyPublicAndText(t *testing.T) {
	priv, _ := hex.DecodeString("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
	want, _ := hex.DecodeString("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
	var k Key
	copy(k[:], priv)
	if pub := k.Public(); !bytes.Equal(pub[:], want) {
		t.Fatalf("public key %x, want %x", pub, want)
	}
	n, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	if n[0]&7 != 0 || n[31]&128 != 0 || n[31]&64 == 0 {
		t.Fatalf("new key not clamped: %x", n)
	}
	back, err := ParseKey(n.String())
	if err != nil || back != n {
		t.Fatalf("ParseKey(%s) = %x, %v", n, back, err)
	}
	if _, err := ParseKey("c2hvcnQ="); err == nil {
		t.Fatal("a 5-byte key parsed")
	}
}

func TestGARPFrame(t *testing.T) {
	src, _ := net.ParseMAC("02:00:00:00:00:01")
	vm, _ := net.ParseMAC("52:54:00:12:34:56")
	f := garpFrame(src, vm, netip.MustParseAddr("10.1.0.10"))
	want, _ := hex.DecodeString("ffffffffffff" + "020000000001" + "0806" + "0001080006040001" +
		"525400123456" + "0a01000a" + "000000000000" + "0a01000a")
	if !bytes.Equal(f, want) {
		t.Fatalf("frame\n %x, want\n %x", f, want)
	}
}

func TestVMRules(t *testing.T) {
	v := VM{OldIP: netip.MustParseAddr("10.1.0.10"), NewIP: netip.MustParseAddr("10.2.0.10"), Tap: "tap0"}
	with := buildVMRules(v, "vhwg00000001", markBase|5)
	if len(with.Pre) != 1 || len(with.Post) != 1 || len(with.Mark) != 4 {
		t.Fatalf("with a tunnel: %d pre, %d post, %d mark rules; want 1, 1, 4", len(with.Pre), len(with.Post), len(with.Mark))
	}
	without := buildVMRules(v, "", 0)
	if len(without.Mark) != 0 || len(without.Post) != 1 || len(without.Pre) != 1 {
		t.Fatalf("without a tunnel: %d mark rules, want none", len(without.Mark))
	}
	if len(without.Post[0]) >= len(with.Post[0]) {
		t.Fatal("SNAT without a tunnel should not exclude the tunnel's interface")
	}
}

// TestTunnelCarriesPackets joins two namespaces by a veth, opens a
// migration's tunnel on each (its own keys, kernel-chosen ports), routes
// an address of each side into its TUN and echoes a datagram across it;
// then closes both and checks nothing is left.
func TestTunnelCarriesPackets(t *testing.T) {
	nsA, nsB := labtest.Netns(t), labtest.Netns(t)
	wanA, wanB := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	inA, inB := netip.MustParseAddr("10.99.0.1"), netip.MustParseAddr("10.99.0.2")
	ha, err := netns.Handle(nsA)
	if err != nil {
		t.Fatal(err)
	}
	defer ha.Close()
	hb, err := netns.Handle(nsB)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "wgtA", Namespace: netlink.NsFd(ha)},
		PeerName: "wgtB", PeerNamespace: netlink.NsFd(hb)}); err != nil {
		t.Fatal(err)
	}
	setup := func(ns, dev string, wan, in netip.Addr) {
		h, err := netlink.NewHandleAt(map[string]vns.NsHandle{nsA: ha, nsB: hb}[ns])
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		for _, name := range []string{"lo", dev} {
			l, err := h.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			if err := h.LinkSetUp(l); err != nil {
				t.Fatal(err)
			}
		}
		l, _ := h.LinkByName(dev)
		if err := h.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(ip4(wan)), Mask: net.CIDRMask(24, 32)}}); err != nil {
			t.Fatal(err)
		}
		lo, _ := h.LinkByName("lo")
		if err := h.AddrAdd(lo, &netlink.Addr{IPNet: host32(in)}); err != nil {
			t.Fatal(err)
		}
	}
	setup(nsA, "wgtA", wanA, inA)
	setup(nsB, "wgtB", wanB, inB)

	pa, pb := New(Options{Netns: nsA, LocalIP: wanA}), New(Options{Netns: nsB, LocalIP: wanB})
	const token = 0x1122334455667788
	keyA, portA, err := pa.OpenTunnel(token)
	if err != nil {
		t.Fatal(err)
	}
	keyB, portB, err := pb.OpenTunnel(token)
	if err != nil {
		t.Fatal(err)
	}
	if portA == 0 || portB == 0 || keyA == keyB {
		t.Fatalf("ports %d %d, keys %s %s", portA, portB, keyA, keyB)
	}
	if err := pa.SetPeer(token, Peer{Key: keyB, Endpoint: netip.AddrPortFrom(wanB, portB),
		Allowed: []netip.Prefix{netip.PrefixFrom(inB, 32)}}); err != nil {
		t.Fatal(err)
	}
	if err := pb.SetPeer(token, Peer{Key: keyA, Endpoint: netip.AddrPortFrom(wanA, portA),
		Allowed: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, Keepalive: 25 * time.Second}); err != nil {
		t.Fatal(err)
	}
	waitHandshake(t, pa, token)
	route := func(p *Path, to netip.Addr) {
		h, err := p.handle()
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		if err := h.RouteAdd(&netlink.Route{Dst: host32(to), LinkIndex: p.tunnels[token].index, Scope: netlink.SCOPE_LINK}); err != nil {
			t.Fatal(err)
		}
	}
	route(pa, inB)
	route(pb, inA)

	srv, err := netns.ListenPacket(nsB, "udp", netip.AddrPortFrom(inB, 9).String())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 2000)
		for {
			n, from, err := srv.ReadFrom(buf)
			if err != nil {
				return
			}
			srv.WriteTo(buf[:n], from)
		}
	}()
	var c net.Conn
	if err := netns.Do(nsA, func() error {
		d := net.Dialer{LocalAddr: &net.UDPAddr{IP: net.IP(ip4(inA))}}
		c, err = d.DialContext(context.Background(), "udp", netip.AddrPortFrom(inB, 9).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := bytes.Repeat([]byte("vmhop through wireguard "), 50) // 1200 bytes, under the TUN's MTU
	got := make([]byte, 2000)
	var n int
	for try := 0; ; try++ {
		c.Write(msg)
		c.SetReadDeadline(time.Now().Add(time.Second))
		if n, err = c.Read(got); err == nil || try == 5 {
			break
		}
	}
	if err != nil || !bytes.Equal(got[:n], msg) {
		t.Fatalf("echo through the tunnel: %d bytes, %v", n, err)
	}
	if hs, err := pa.Handshake(token); err != nil || hs.IsZero() {
		t.Fatalf("no handshake on A: %v %v", hs, err)
	}
	ct := pa.tunnels[token].tun.counters()
	if ct["encap_packets"] == 0 || ct["decap_packets"] == 0 {
		t.Fatalf("A's tunnel counters: %v", ct)
	}

	for _, p := range []*Path{pa, pb} {
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{nsA, nsB} {
		assertClean(t, ns)
	}
}

// assertClean fails t if namespace ns holds anything of this package:
// a TUN device, a table, a policy rule at RulePriority.
func assertClean(t *testing.T, ns string) {
	t.Helper()
	p := New(Options{Netns: ns})
	h, err := p.handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	links, _ := h.LinkList()
	for _, l := range links {
		if len(l.Attrs().Name) > 4 && l.Attrs().Name[:4] == "vhwg" {
			t.Errorf("%s: device %s left", ns, l.Attrs().Name)
		}
	}
	rules, _ := h.RuleList(netlink.FAMILY_V4)
	for _, r := range rules {
		if r.Priority == RulePriority {
			t.Errorf("%s: rule left: %v", ns, r)
		}
	}
	if pn, _ := h.NeighProxyList(0, netlink.FAMILY_V4); len(pn) != 0 {
		t.Errorf("%s: proxy neighbours left: %v", ns, pn)
	}
	if ts, err := Tables(ns); err != nil || len(ts) != 0 {
		t.Errorf("%s: nftables tables left: %v %v", ns, ts, err)
	}
}

// TestSweep: a destination's VM entry and tunnel as a vmhopd that died
// leaves them (its wireguard-go gone, so its TUN too): Sweep removes
// the tables, the rule, the routes and new_ip's proxy neighbour.
func TestSweep(t *testing.T) {
	ns := labtest.Netns(t)
	nsh, err := netns.Handle(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, name := range []string{"up0", "tap0"} {
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{name, name + "p"} {
			l, _ := h.LinkByName(n)
			h.LinkSetUp(l)
		}
	}
	up, _ := h.LinkByName("up0")
	if err := h.AddrAdd(up, &netlink.Addr{IPNet: &net.IPNet{IP: net.IP{192, 0, 2, 2}, Mask: net.CIDRMask(24, 32)}}); err != nil {
		t.Fatal(err)
	}
	p := New(Options{Netns: ns, LocalIP: netip.MustParseAddr("192.0.2.2")})
	const token = 42
	if _, _, err := p.OpenTunnel(token); err != nil {
		t.Fatal(err)
	}
	gw, _ := net.ParseMAC("02:00:00:00:00:01")
	vm, _ := net.ParseMAC("52:54:00:00:00:02")
	if err := p.SetVM(VM{OldIP: netip.MustParseAddr("10.1.0.10"), NewIP: netip.MustParseAddr("192.0.2.10"),
		GatewayMAC: gw, MAC: vm, Tap: "tap0", Token: token}); err != nil {
		t.Fatal(err)
	}
	p.tunnels[token].dev.Close() // the process dies: its TUN goes with it
	// The restarted vmhopd sweeps what its tunnels left; the VM that
	// moved in keeps its entry.
	gone, err := Sweep(ns, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("swept at a restart: %v", gone)
	if ts := mustTables(t, ns); len(gone) != 2 || !slices.Equal(ts, []string{"vmhop_vm_10_1_0_10"}) {
		t.Errorf("swept %v, left %v: want the tunnel's table and rule gone, the VM's table kept", gone, ts)
	}
	// A new process (the restarted vmhopd's undo of an incoming
	// migration) removes the VM entry it never made, by name and mark.
	if err := New(Options{Netns: ns, LocalIP: netip.MustParseAddr("192.0.2.2")}).RemoveVM(
		netip.MustParseAddr("10.1.0.10"), netip.MustParseAddr("192.0.2.10")); err != nil {
		t.Fatal(err)
	}
	if gone, err := Sweep(ns, true); err != nil || len(gone) != 0 {
		t.Errorf("swept after RemoveVM: %v, %v; want nothing left", gone, err)
	}
	assertClean(t, ns)
}

// waitHandshake waits until p's tunnel has made its handshake (B's
// keepalive starts it; data sent from both ends before it completes can
// make both start one at once, and WireGuard then waits 5 s to retry).
func waitHandshake(t *testing.T, p *Path, token uint64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if hs, err := p.Handshake(token); err == nil && !hs.IsZero() {
			return
		}
	}
	t.Fatalf("no handshake on %s in 10 s", TunnelName(token))
}

func mustTables(t *testing.T, ns string) []string {
	t.Helper()
	ts, err := Tables(ns)
	if err != nil {
		t.Fatal(err)
	}
	return ts
}
