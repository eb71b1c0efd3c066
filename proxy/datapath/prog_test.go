package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/bpf"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
)

// The tunnel's outer header (bpf/consts.h: TUNNEL_OVERHEAD) and its
// protocol number.
const (
	tunnelOverhead = 20 + 8 + 8 // IPv4, UDP, token
	tunnelProto    = 17
	tunnelPort     = 6080
	testToken      = 0x1122334455667788
)

var (
	toA = Tunnel{Peer: hostA, Token: testToken}
	toB = Tunnel{Peer: hostB, Token: testToken}
)

// TC return codes (linux/pkt_cls.h).
const (
	actOK       = 0
	actShot     = 2
	actRedirect = 7
)

var (
	hostA    = netip.MustParseAddr("10.1.0.2")
	hostB    = netip.MustParseAddr("10.2.0.2")
	oldIP    = netip.MustParseAddr("10.1.0.10")
	newIP    = netip.MustParseAddr("10.2.0.10")
	gwA      = netip.MustParseAddr("10.1.0.1")
	clientIP = netip.MustParseAddr("10.0.0.2")
	nextHop  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x01} // the router, as a permanent neighbour
	vmMAC    = net.HardwareAddr{0x52, 0x54, 0, 0xaa, 0xbb, 0xcc}
	gwMAC    = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0a}
)

// skbCtx is struct __sk_buff as BPF_PROG_TEST_RUN takes it (only the fields
// it accepts are set).
type skbCtx struct {
	_              [9]uint32 // len .. priority
	IngressIfindex uint32
	Ifindex        uint32
	_              [151]byte
	_              [37]byte
}

// testHost is a namespace with one interface (u0, addr/24) whose routes to
// the other test subnets go via a router with a fixed MAC, so FIB lookups
// in the programs give known answers.
type testHost struct {
	ns  string
	ifi *net.Interface
	dp  *Datapath
	ctx skbCtx
}

func newTestHost(t *testing.T, local netip.Addr) *testHost {
	t.Helper()
	ns := labtest.Netns(t)
	gw := netip.AddrFrom4([4]byte{local.As4()[0], local.As4()[1], local.As4()[2], 1})
	for _, args := range [][]string{
		{"link", "add", "u0", "type", "veth", "peer", "name", "u1"},
		{"link", "set", "u0", "up"}, {"link", "set", "u1", "up"},
		{"addr", "add", local.String() + "/24", "dev", "u0"},
		{"neigh", "add", gw.String(), "lladdr", nextHop.String(), "dev", "u0", "nud", "permanent"},
		{"route", "add", "10.0.0.0/8", "via", gw.String(), "dev", "u0"},
	} {
		if _, err := netns.Run(context.Background(), ns, "ip", args...); err != nil {
			t.Fatal(err)
		}
	}
	h := &testHost{ns: ns}
	err := netns.Do(ns, func() (err error) {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			return err
		}
		h.ifi, err = net.InterfaceByName("u0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	dp, err := Load(Options{LocalIP: local})
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	h.dp = dp
	h.ctx = skbCtx{IngressIfindex: uint32(h.ifi.Index), Ifindex: uint32(h.ifi.Index)}
	return h
}

// run runs prog on frame inside the host's namespace.
func (h *testHost) run(t *testing.T, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	t.Helper()
	out := make([]byte, len(frame)+256)
	var ret uint32
	err := netns.Do(h.ns, func() (err error) {
		opts := ebpf.RunOptions{Data: frame, DataOut: out, Context: h.ctx}
		ret, err = prog.Run(&opts)
		out = opts.DataOut
		return err
	})
	if err != nil {
		t.Fatalf("prog run: %v", err)
	}
	return ret, out
}

type pktSpec struct {
	src, dst     netip.Addr
	proto        layers.IPProtocol
	sport, dport uint16
	syn, ack     bool
	fin          bool
	echoReply    bool   // ICMP: an echo reply (id: dport) instead of a request (id: sport)
	mss          uint16 // TCP SYN option
	payload      int
	df           bool
	frag         bool
	options      bool // IP options (ihl 6)
	srcMAC       net.HardwareAddr
}

func ip4(a netip.Addr) net.IP { b := a.As4(); return net.IP(b[:]) }

// frame builds an Ethernet frame with valid checksums.
func frame(t *testing.T, s pktSpec) []byte {
	t.Helper()
	src := s.srcMAC
	if src == nil {
		src = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}
	}
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 63, Protocol: s.proto, SrcIP: ip4(s.src), DstIP: ip4(s.dst), Id: 77}
	if s.df {
		ip.Flags = layers.IPv4DontFragment
	}
	if s.frag {
		ip.Flags = layers.IPv4MoreFragments
	}
	if s.options {
		ip.Options = []layers.IPv4Option{{OptionType: 1}, {OptionType: 1}, {OptionType: 1}, {OptionType: 0}}
	}
	payload := gopacket.Payload(bytes.Repeat([]byte{0xab}, s.payload))
	var l4 gopacket.SerializableLayer
	switch s.proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(s.sport), DstPort: layers.TCPPort(s.dport), SYN: s.syn, ACK: s.ack, FIN: s.fin, Seq: 1000, Window: 64240}
		if s.mss != 0 {
			tcp.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindNop}, {OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: binary.BigEndian.AppendUint16(nil, s.mss)}}
		}
		tcp.SetNetworkLayerForChecksum(ip)
		l4 = tcp
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(s.sport), DstPort: layers.UDPPort(s.dport)}
		udp.SetNetworkLayerForChecksum(ip)
		l4 = udp
	case layers.IPProtocolICMPv4:
		l4 = &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(8, 0), Id: s.sport, Seq: 1}
		if s.echoReply {
			l4 = &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(0, 0), Id: s.dport, Seq: 1}
		}
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, l4, payload); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// csum16 is the Internet checksum of b.
func csum16(b []byte, initial uint32) uint16 {
	s := initial
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// checkIPv4 fails t unless the IPv4 packet at b has valid IP and L4 checksums.
func checkIPv4(t *testing.T, what string, b []byte) {
	t.Helper()
	ihl := int(b[0]&0xf) * 4
	if csum16(b[:ihl], 0) != 0 {
		t.Errorf("%s: bad IP header checksum", what)
	}
	tot := int(binary.BigEndian.Uint16(b[2:]))
	if tot > len(b) {
		t.Fatalf("%s: tot_len %d > %d bytes", what, tot, len(b))
	}
	l4 := b[ihl:tot]
	switch b[9] {
	case 6, 17:
		var ph uint32
		for i := 12; i < 20; i += 2 {
			ph += uint32(b[i])<<8 | uint32(b[i+1])
		}
		ph += uint32(b[9]) + uint32(len(l4))
		if csum16(l4, ph) != 0 {
			t.Errorf("%s: bad L4 checksum (proto %d)", what, b[9])
		}
	case 1:
		if csum16(l4, 0) != 0 {
			t.Errorf("%s: bad ICMP checksum", what)
		}
	}
}

func TestProgramsOnCraftedPackets(t *testing.T) {
	a := newTestHost(t, hostA)
	up, _ := a.dp.Programs()
	if err := a.dp.SetPeer(toB, true); err != nil {
		t.Fatal(err)
	}
	if err := a.dp.SetRedirect(oldIP, toB, vmMAC, false); err != nil {
		t.Fatal(err)
	}
	toVM := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 40000, dport: 80, ack: true, payload: 100, df: true})

	t.Run("redirect off passes", func(t *testing.T) {
		ret, out := a.run(t, up, toVM)
		if ret != actOK || !bytes.Equal(out, toVM) {
			t.Fatalf("ret %d, changed=%v", ret, !bytes.Equal(out, toVM))
		}
	})
	if err := a.dp.SetRedirect(oldIP, toB, vmMAC, true); err != nil {
		t.Fatal(err)
	}
	t.Run("encap", func(t *testing.T) {
		ret, out := a.run(t, up, toVM)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		if len(out) != len(toVM)+tunnelOverhead {
			t.Fatalf("len %d, want %d", len(out), len(toVM)+tunnelOverhead)
		}
		if !bytes.Equal(out[0:6], nextHop) || !bytes.Equal(out[6:12], a.ifi.HardwareAddr) {
			t.Errorf("ethernet %s <- %s, want %s <- %s", net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]), nextHop, a.ifi.HardwareAddr)
		}
		// Outer IPv4 (DF, UDP, A -> B), UDP (source port from the flow
		// hash in 49152-65535, to the tunnel port, no checksum), token.
		outer := out[14 : 14+tunnelOverhead]
		want := []byte{0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 2, 10, 2, 0, 2,
			0, 0, tunnelPort >> 8, tunnelPort & 0xff, 0, 0, 0, 0}
		want = binary.NativeEndian.AppendUint64(want, testToken)
		binary.BigEndian.PutUint16(want[2:], uint16(len(toVM)-14+tunnelOverhead))
		binary.BigEndian.PutUint16(want[10:], binary.BigEndian.Uint16(outer[10:]))
		binary.BigEndian.PutUint16(want[24:], uint16(len(toVM)-14+16))
		sport := binary.BigEndian.Uint16(outer[20:])
		binary.BigEndian.PutUint16(want[20:], sport)
		if !bytes.Equal(outer, want) || sport < 49152 {
			t.Errorf("outer header\n got % x\nwant % x (source port 49152-65535)", outer, want)
		}
		checkIPHeader(t, "outer", out[14:])
		if !bytes.Equal(out[14+tunnelOverhead:], toVM[14:]) {
			t.Errorf("inner packet changed")
		}
		c, _ := a.dp.Stats(oldIP)
		if c["encap_packets"] != 1 || c["encap_bytes"] != uint64(len(toVM)) {
			t.Errorf("counters %v", c)
		}
		if idle, ok, _ := a.dp.Idle(oldIP); !ok || idle < 0 || idle > 10e9 {
			t.Errorf("idle %v %v", idle, ok)
		}
	})
	t.Run("ARP for the redirected old address", func(t *testing.T) {
		ret, out := a.run(t, up, arpRequest(nextHop, gwA, oldIP))
		p := gopacket.NewPacket(out, layers.LayerTypeEthernet, gopacket.Default)
		arp, _ := p.Layer(layers.LayerTypeARP).(*layers.ARP)
		if ret != actRedirect || arp == nil || arp.Operation != 2 || !bytes.Equal(arp.SourceHwAddress, vmMAC) ||
			!bytes.Equal(arp.SourceProtAddress, ip4(oldIP)) || !bytes.Equal(out[0:6], nextHop) {
			t.Fatalf("ret %d reply %v", ret, p)
		}
	})
	t.Run("SYN MSS clamped", func(t *testing.T) {
		syn := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 40001, dport: 80, syn: true, mss: 1460, df: true})
		ret, out := a.run(t, up, syn)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		inner := out[14+tunnelOverhead:]
		checkIPv4(t, "inner SYN", inner)
		// options start after the 20-byte TCP header: NOP, then kind 2 len 4 MSS.
		if got := binary.BigEndian.Uint16(inner[20+20+3:]); got != 1500-tunnelOverhead-40 {
			t.Errorf("MSS %d, want %d", got, 1500-tunnelOverhead-40)
		}
	})
	t.Run("too big gets ICMP fragmentation needed", func(t *testing.T) {
		big := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 40000, dport: 80, ack: true, payload: 1460, df: true})
		ret, out := a.run(t, up, big)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		if len(out) != 14+20+8+28 {
			t.Fatalf("len %d", len(out))
		}
		if !bytes.Equal(out[0:6], big[6:12]) || !bytes.Equal(out[6:12], big[0:6]) {
			t.Errorf("ethernet not swapped")
		}
		ip := out[14:]
		checkIPv4(t, "icmp", ip)
		if !bytes.Equal(ip[12:16], ip4(hostA)) || !bytes.Equal(ip[16:20], ip4(clientIP)) || ip[9] != 1 {
			t.Errorf("icmp ip header % x", ip[:20])
		}
		icmp := ip[20:]
		if icmp[0] != 3 || icmp[1] != 4 || binary.BigEndian.Uint16(icmp[6:]) != 1500-tunnelOverhead {
			t.Errorf("icmp % x, want type 3 code 4 mtu %d", icmp[:8], 1500-tunnelOverhead)
		}
		if !bytes.Equal(icmp[8:36], big[14:42]) {
			t.Errorf("icmp does not quote the original header")
		}
		c, _ := a.dp.Stats(oldIP)
		if c["icmp_too_big"] != 1 {
			t.Errorf("counters %v", c)
		}
		// Only oldIP has counters here: the host's totals are its counters.
		tot, err := a.dp.Totals()
		if err != nil || len(tot) != len(CounterNames) || tot["icmp_too_big"] != 1 || tot["encap_packets"] != c["encap_packets"] ||
			tot["encap_bytes"] != c["encap_bytes"] || c["encap_packets"] == 0 {
			t.Errorf("totals %v, %v; stats of %s %v", tot, err, oldIP, c)
		}
	})
	t.Run("decap relays the VM's replies", func(t *testing.T) {
		inner := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolTCP, sport: 80, dport: 40000, ack: true, payload: 50})
		tun := tunnel(t, hostB, hostA, inner)
		ret, out := a.run(t, up, tun)
		if ret != actRedirect || !bytes.Equal(out[14:], inner[14:]) {
			t.Fatalf("ret %d, out % x", ret, out[:40])
		}
		if !bytes.Equal(out[0:6], nextHop) {
			t.Errorf("not sent to the router")
		}
	})
	t.Run("tunnel from unknown peer passes", func(t *testing.T) {
		inner := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolUDP, sport: 53, dport: 5353})
		tun := tunnel(t, netip.MustParseAddr("10.9.9.9"), hostA, inner)
		ret, out := a.run(t, up, tun)
		if ret != actOK || !bytes.Equal(out, tun) {
			t.Fatalf("ret %d", ret)
		}
	})
	t.Run("spoofed: the peer's address without the token", func(t *testing.T) {
		inner := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 1, dport: 80, ack: true})
		before, _ := a.dp.HostStats()
		for _, tok := range []uint64{0, testToken + 1, testToken ^ 1<<63} {
			if ret, _ := a.run(t, up, tunnelWith(t, hostB, hostA, tok, inner)); ret != actShot {
				t.Errorf("token %#x from the peer's address: ret %d, want dropped", tok, ret)
			}
		}
		after, _ := a.dp.HostStats()
		if d := after["drop_spoofed"] - before["drop_spoofed"]; d != 3 {
			t.Errorf("drop_spoofed went up by %d, want 3", d)
		}
		// IPIP from the peer's address is not the tunnel: untouched.
		ipip := tunnel(t, hostB, hostA, inner)
		ipip = append(append([]byte(nil), ipip[:14+20]...), ipip[14+tunnelOverhead:]...)
		ipip[14+9] = 4
		binary.BigEndian.PutUint16(ipip[16:], uint16(len(ipip)-14))
		ipip[24], ipip[25] = 0, 0
		binary.BigEndian.PutUint16(ipip[24:], csum16(ipip[14:34], 0))
		ret, out := a.run(t, up, ipip)
		if ret != actOK || !bytes.Equal(out, ipip) {
			t.Errorf("IPIP from the peer: ret %d", ret)
		}
	})
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"ip options", frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 1, dport: 80, options: true})},
		{"tot_len beyond frame", toVM[:len(toVM)-10]},
		{"truncated tcp", toVM[:14+20+10]},
		{"arp", append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 9, 0x08, 0x06}, make([]byte, 28)...)},
		{"ipv6", append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 9, 0x86, 0xdd, 0x60}, make([]byte, 60)...)},
		// Frames shorter than an Ethernet and an IPv4 header are refused by
		// BPF_PROG_TEST_RUN itself; parse_ipv4 bounds-checks them anyway.
	} {
		t.Run("untouched: "+c.name, func(t *testing.T) {
			ret, out := a.run(t, up, c.b)
			if ret != actOK || !bytes.Equal(out, c.b) {
				t.Fatalf("ret %d, changed=%v", ret, !bytes.Equal(out, c.b))
			}
		})
	}

	b := newTestHost(t, hostB)
	upB, vmB := b.dp.Programs()
	b.dp.SetPeer(toA, true)
	if err := b.dp.SetVM(VM{OldIP: oldIP, NewIP: newIP, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC, Tap: b.ifi.Index, Peer: hostA, Token: testToken}); err != nil {
		t.Fatal(err)
	}
	t.Run("decap delivers to the VM", func(t *testing.T) {
		tun := tunnel(t, hostA, hostB, toVM)
		ret, out := b.run(t, upB, tun)
		if ret != actRedirect || !bytes.Equal(out[14:], toVM[14:]) {
			t.Fatalf("ret %d", ret)
		}
		if !bytes.Equal(out[0:6], vmMAC) || !bytes.Equal(out[6:12], gwMAC) {
			t.Errorf("ethernet %s <- %s", net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]))
		}
	})
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP, layers.IPProtocolICMPv4} {
		t.Run("DNAT "+proto.String(), func(t *testing.T) {
			in := frame(t, pktSpec{src: clientIP, dst: newIP, proto: proto, sport: 41000, dport: 7, syn: true, payload: 33})
			ret, out := b.run(t, upB, in)
			if ret != actRedirect {
				t.Fatalf("ret %d", ret)
			}
			if !bytes.Equal(out[14+16:14+20], ip4(oldIP)) {
				t.Errorf("dst % x, want old ip", out[30:34])
			}
			checkIPv4(t, "dnat", out[14:])
		})
	}
	t.Run("ARP for the old gateway", func(t *testing.T) {
		req := arpRequest(vmMAC, oldIP, gwA)
		ret, out := b.run(t, vmB, req)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		p := gopacket.NewPacket(out, layers.LayerTypeEthernet, gopacket.Default)
		arp, _ := p.Layer(layers.LayerTypeARP).(*layers.ARP)
		if arp == nil || arp.Operation != 2 || !bytes.Equal(arp.SourceHwAddress, gwMAC) ||
			!bytes.Equal(arp.SourceProtAddress, ip4(gwA)) || !bytes.Equal(arp.DstHwAddress, vmMAC) || !bytes.Equal(out[0:6], vmMAC) {
			t.Fatalf("reply %v", p)
		}
	})
	t.Run("VM's new connection leaves from new ip", func(t *testing.T) {
		syn := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolTCP, sport: 5555, dport: 80, syn: true, srcMAC: vmMAC})
		ret, out := b.run(t, vmB, syn)
		if ret != actRedirect || !bytes.Equal(out[14+12:14+16], ip4(newIP)) {
			t.Fatalf("ret %d src % x", ret, out[26:30])
		}
		checkIPv4(t, "snat", out[14:])
		// The rest of that connection also uses new ip.
		ack := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolTCP, sport: 5555, dport: 80, ack: true, payload: 10, srcMAC: vmMAC})
		ret, out = b.run(t, vmB, ack)
		if ret != actRedirect || !bytes.Equal(out[14+12:14+16], ip4(newIP)) {
			t.Fatalf("ack: ret %d src % x", ret, out[26:30])
		}
	})
	t.Run("reply on a pre-switch flow goes back through the tunnel", func(t *testing.T) {
		reply := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolTCP, sport: 80, dport: 40000, ack: true, payload: 10, srcMAC: vmMAC})
		ret, out := b.run(t, vmB, reply)
		if ret != actRedirect || out[14+9] != tunnelProto || !bytes.Equal(out[14+12:14+16], ip4(hostB)) || !bytes.Equal(out[14+16:14+20], ip4(hostA)) {
			t.Fatalf("ret %d outer % x", ret, out[14:34])
		}
		if !bytes.Equal(out[14+tunnelOverhead:], reply[14:]) {
			t.Errorf("inner changed")
		}
		// A reply to a client that reached the VM at new ip uses new ip.
		b.run(t, upB, frame(t, pktSpec{src: clientIP, dst: newIP, proto: layers.IPProtocolTCP, sport: 42000, dport: 80, ack: true}))
		r2 := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolTCP, sport: 80, dport: 42000, ack: true, srcMAC: vmMAC})
		ret, out = b.run(t, vmB, r2)
		if ret != actRedirect || !bytes.Equal(out[14+12:14+16], ip4(newIP)) {
			t.Fatalf("new-ip flow reply: ret %d src % x", ret, out[26:30])
		}
	})
}

// tunnel wraps the IPv4 packet in frame the way the datapath does: outer
// IPv4 (DF) and UDP to the tunnel port, then the token (testToken).
func tunnel(t *testing.T, src, dst netip.Addr, inner []byte) []byte {
	return tunnelWith(t, src, dst, testToken, inner)
}

func tunnelWith(t *testing.T, src, dst netip.Addr, token uint64, inner []byte) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: nextHop, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: ip4(src), DstIP: ip4(dst), Flags: layers.IPv4DontFragment}
	udp := &layers.UDP{SrcPort: 50000, DstPort: tunnelPort}
	udp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	payload := binary.NativeEndian.AppendUint64(nil, token)
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, udp, gopacket.Payload(append(payload, inner[14:]...))); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	b[14+20+6], b[14+20+7] = 0, 0 // no UDP checksum, as the datapath sends
	return b
}

func arpRequest(from net.HardwareAddr, spa, tpa netip.Addr) []byte {
	eth := &layers.Ethernet{SrcMAC: from, DstMAC: layers.EthernetBroadcast, EthernetType: layers.EthernetTypeARP}
	arp := &layers.ARP{AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4, HwAddressSize: 6, ProtAddressSize: 4,
		Operation: 1, SourceHwAddress: from, SourceProtAddress: ip4(spa), DstHwAddress: make([]byte, 6), DstProtAddress: ip4(tpa)}
	buf := gopacket.NewSerializeBuffer()
	gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, eth, arp)
	return buf.Bytes()
}

// TestRestartKeepsState: a daemon that exits without Remove leaves its maps
// and links pinned (forwarding goes on); the next one takes them over.
func TestRestartKeepsState(t *testing.T) {
	h := newTestHost(t, hostA)
	pin := t.TempDir() // not bpffs: pinning must fail clearly there
	if _, err := Load(Options{LocalIP: hostA, PinDir: pin}); err == nil {
		t.Fatal("pinning outside bpffs succeeded")
	}
	pin = "/sys/fs/bpf/vmhop/" + h.ns
	t.Cleanup(func() { os.RemoveAll(pin) })
	first, err := Load(Options{LocalIP: hostA, PinDir: pin})
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(netns.Do(h.ns, func() error { return first.Attach(Uplink, "u0") }))
	must(first.SetRedirect(oldIP, toB, vmMAC, true))
	first.Close() // the daemon dies

	links, _ := os.ReadDir(pin)
	names := ""
	for _, e := range links {
		names += e.Name() + " "
	}
	if !bytes.Contains([]byte(names), []byte("link-uplink-")) || !bytes.Contains([]byte(names), []byte("redirects")) {
		t.Fatalf("pins after exit: %s", names)
	}
	second, err := Load(Options{LocalIP: hostA, PinDir: pin})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := second.Stats(oldIP); err != nil {
		t.Fatalf("second daemon lost the first one's state: %v", err)
	}
	var r struct {
		Peer, Mode uint32
		Mac        [6]byte
		Pad        [2]byte
		Token      uint64
	}
	old, _ := be32(oldIP)
	peer, _ := be32(hostB)
	must(second.objs.Redirects.Lookup(old, &r))
	if r.Mode != 1 || r.Peer != peer {
		t.Fatalf("redirect after restart: %+v", r)
	}
	must(netns.Do(h.ns, func() error { return second.Attach(Uplink, "u0") }))
	must(netns.Do(h.ns, second.Remove))
	if _, err := os.Stat(pin); !os.IsNotExist(err) {
		left, _ := os.ReadDir(pin)
		t.Fatalf("pins left after Remove: %v", left)
	}
}

// TestLegacyAttach: kernels without TCX get a clsact qdisc and a
// direct-action tc filter; Detach removes the filter.
func TestLegacyAttach(t *testing.T) {
	h := newTestHost(t, hostA)
	dp, err := Load(Options{LocalIP: hostA, Legacy: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if err := netns.Do(h.ns, func() error { return dp.Attach(Uplink, "u0") }); err != nil {
		t.Fatal(err)
	}
	out, err := netns.Run(context.Background(), h.ns, "tc", "filter", "show", "dev", "u0", "ingress")
	if err != nil || !bytes.Contains([]byte(out), []byte("vmhop-uplink")) || !bytes.Contains([]byte(out), []byte("direct-action")) {
		t.Fatalf("tc filter after legacy attach: %q, %v", out, err)
	}
	if err := netns.Do(h.ns, func() error { return dp.Detach("u0") }); err != nil {
		t.Fatal(err)
	}
	out, _ = netns.Run(context.Background(), h.ns, "tc", "filter", "show", "dev", "u0", "ingress")
	if bytes.Contains([]byte(out), []byte("vmhop")) {
		t.Fatalf("filter left after detach: %q", out)
	}
}

// hostB is a test host B with the moved VM (old_ip, new_ip, peer host A).
func hostBWithVM(t *testing.T) *testHost {
	t.Helper()
	b := newTestHost(t, hostB)
	if err := b.dp.SetPeer(toA, true); err != nil {
		t.Fatal(err)
	}
	if err := b.dp.SetVM(VM{OldIP: oldIP, NewIP: newIP, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC, Tap: b.ifi.Index, Peer: hostA, Token: testToken}); err != nil {
		t.Fatal(err)
	}
	return b
}

// l4ports returns the source and destination ports of the IPv4 packet ip
// (ICMP: the echo id as both).
func l4ports(ip []byte) (uint16, uint16) {
	l4 := ip[int(ip[0]&0xf)*4:]
	if ip[9] == 1 {
		id := binary.BigEndian.Uint16(l4[4:])
		return id, id
	}
	return binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
}

// wantRewritten fails t unless out (an Ethernet frame) is in (one) with only
// the given IPv4 addresses and ports changed, and valid checksums.
func wantRewritten(t *testing.T, what string, out, in []byte, src, dst netip.Addr, sport, dport uint16) {
	t.Helper()
	ip := out[14:]
	checkIPv4(t, what, ip)
	if !bytes.Equal(ip[12:16], ip4(src)) || !bytes.Equal(ip[16:20], ip4(dst)) {
		t.Errorf("%s: %s -> %s, want %s -> %s", what, net.IP(ip[12:16]), net.IP(ip[16:20]), src, dst)
	}
	if s, d := l4ports(ip); s != sport || d != dport {
		t.Errorf("%s: ports %d -> %d, want %d -> %d", what, s, d, sport, dport)
	}
	// Everything else as it was: compare with the fields put back.
	norm := func(b []byte) []byte {
		c := append([]byte(nil), b[14:]...)
		copy(c[10:12], []byte{0, 0})
		copy(c[12:20], make([]byte, 8))
		l4 := c[int(c[0]&0xf)*4:]
		switch c[9] {
		case 6:
			copy(l4[0:4], make([]byte, 4))
			copy(l4[16:18], []byte{0, 0})
		case 17:
			copy(l4[0:4], make([]byte, 4))
			copy(l4[6:8], []byte{0, 0})
		case 1:
			copy(l4[2:6], make([]byte, 4))
		}
		return c
	}
	if !bytes.Equal(norm(out), norm(in)) {
		t.Errorf("%s: more than addresses, ports and checksums changed:\n got % x\nwant % x", what, norm(out), norm(in))
	}
}

// TestSharedTuplesAtNAT: host B never lets two client flows share one guest
// 4-tuple. A flow through the tunnel (client:P -> old_ip:7) holds its tuple;
// a new flow from P to new_ip:7 gets another client port, replies are
// translated back, and each side's packets keep their own way out.
func TestSharedTuplesAtNAT(t *testing.T) {
	b := hostBWithVM(t)
	up, vmProg := b.dp.Programs()
	const P = 40007
	type flowCase struct {
		name  string
		proto layers.IPProtocol
		port  uint16 // the client's; ICMP: the echo id
		fin   bool   // the tunnel flow closed (the VM's socket in TIME_WAIT)
	}
	for _, c := range []flowCase{
		{"tcp live", layers.IPProtocolTCP, P, false},
		{"tcp time-wait", layers.IPProtocolTCP, P + 1, true},
		{"udp", layers.IPProtocolUDP, P, false},
		{"icmp echo", layers.IPProtocolICMPv4, P, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			svc := uint16(7)
			if c.proto == layers.IPProtocolICMPv4 {
				svc = c.port // parse: an echo request's id is the requester's port
			}
			// 1. The flow through the tunnel, and the VM's answer.
			in := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: c.proto, sport: c.port, dport: 7, ack: true, payload: 10})
			if ret, out := b.run(t, up, tunnel(t, hostA, hostB, in)); ret != actRedirect || !bytes.Equal(out[14:], in[14:]) {
				t.Fatalf("tunnel flow: ret %d", ret)
			}
			back := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: c.proto, sport: 7, dport: c.port, ack: true, fin: c.fin, srcMAC: vmMAC, echoReply: true})
			if ret, out := b.run(t, vmProg, back); ret != actRedirect || out[14+9] != tunnelProto || !bytes.Equal(out[14+tunnelOverhead:], back[14:]) {
				t.Fatalf("tunnel flow's answer not tunnelled unchanged: ret %d", ret)
			}
			// 2. The same client port to new_ip: translated.
			syn := frame(t, pktSpec{src: clientIP, dst: newIP, proto: c.proto, sport: c.port, dport: 7, syn: true, payload: 5})
			ret, out := b.run(t, up, syn)
			if ret != actRedirect {
				t.Fatalf("NAT flow: ret %d", ret)
			}
			gp, _ := l4ports(out[14:])
			if gp == c.port || gp < 1024 || gp >= 1024+31744 {
				t.Fatalf("NAT flow reached the VM from port %d, want a translated port in 1024-32767 (not %d)", gp, c.port)
			}
			_ = svc
			dport := uint16(7)
			if c.proto == layers.IPProtocolICMPv4 {
				dport = gp
			}
			wantRewritten(t, "dnat", out, syn, clientIP, oldIP, gp, dport)
			// Again: the same translation (nat_ports), no new one.
			if _, out2 := b.run(t, up, syn); !bytes.Equal(out2, out) {
				t.Errorf("second packet of the NAT flow translated differently")
			}
			// 3. The VM's reply on the translated tuple leaves from new_ip to P.
			reply := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: c.proto, sport: 7, dport: gp, syn: true, ack: true, srcMAC: vmMAC, echoReply: true})
			ret, out = b.run(t, vmProg, reply)
			if ret != actRedirect {
				t.Fatalf("NAT reply: ret %d", ret)
			}
			sport := uint16(7)
			if c.proto == layers.IPProtocolICMPv4 {
				sport = c.port
			}
			wantRewritten(t, "snat", out, reply, newIP, clientIP, sport, c.port)
			// 4. The tunnel flow still goes its way, untranslated.
			if ret, out := b.run(t, vmProg, back); ret != actRedirect || out[14+9] != tunnelProto || !bytes.Equal(out[14+tunnelOverhead:], back[14:]) {
				t.Fatalf("tunnel flow after the NAT flow: ret %d", ret)
			}
		})
	}
	// The other order: a NAT flow from port Q first, then the same client
	// port to old_ip through the tunnel gets the translated port.
	t.Run("tunnel flow after NAT flow", func(t *testing.T) {
		const Q = 40100
		syn := frame(t, pktSpec{src: clientIP, dst: newIP, proto: layers.IPProtocolTCP, sport: Q, dport: 8, syn: true})
		ret, out := b.run(t, up, syn)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		wantRewritten(t, "dnat", out, syn, clientIP, oldIP, Q, 8) // its own port: free
		in := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: Q, dport: 8, syn: true})
		ret, out = b.run(t, up, tunnel(t, hostA, hostB, in))
		if ret != actRedirect {
			t.Fatalf("tunnel: ret %d", ret)
		}
		gp, _ := l4ports(out[14:])
		if gp == Q {
			t.Fatalf("tunnel flow reached the VM on the NAT flow's tuple (port %d)", gp)
		}
		wantRewritten(t, "tunnel", out, in, clientIP, oldIP, gp, 8)
		back := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolTCP, sport: 8, dport: gp, syn: true, ack: true, srcMAC: vmMAC})
		ret, out = b.run(t, vmProg, back)
		if ret != actRedirect || out[14+9] != tunnelProto {
			t.Fatalf("reply: ret %d, not tunnelled", ret)
		}
		wantRewritten(t, "tunnel back (inner)", append(make([]byte, 14), out[14+tunnelOverhead:]...), back, oldIP, clientIP, 8, Q)
		// A router's error about that packet, through the tunnel: the VM
		// sees it quote its own packet (the translated port).
		router := netip.MustParseAddr("10.0.9.1")
		fn := icmpError(t, router, oldIP, 3, 4, 1400, out[14+tunnelOverhead:], nil)
		ret, got := b.run(t, up, tunnel(t, hostA, hostB, fn))
		if ret != actRedirect {
			t.Fatalf("frag-needed through the tunnel: ret %d", ret)
		}
		checkIPv4(t, "frag-needed to the VM", got[14:])
		if q := got[42:70]; !bytes.Equal(q, back[14:42]) {
			t.Errorf("quoted packet\n got % x\nwant % x (the VM's own)", q, back[14:42])
		}
	})
	c, _ := b.dp.Stats(oldIP)
	if c["nat_port_translated"] != 5 {
		t.Errorf("nat_port_translated %d, want 5", c["nat_port_translated"])
	}
}

// fragments splits the IPv4 packet in frame into two fragments, the first
// with the first n bytes (a multiple of 8) after the IP header; each gets
// a valid header checksum.
func fragments(t *testing.T, frame []byte, n int) (first, later []byte) {
	t.Helper()
	hdr := func(payload []byte, off int, mf bool) []byte {
		b := append(append([]byte(nil), frame[:34]...), payload...)
		ip := b[14:]
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(payload)))
		fo := uint16(off / 8)
		if mf {
			fo |= 0x2000
		}
		binary.BigEndian.PutUint16(ip[6:], fo)
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], csum16(ip[:20], 0))
		return b
	}
	return hdr(frame[34:34+n], 0, true), hdr(frame[34+n:], n, false)
}

// reassemble joins two fragments' IPv4 packets (Ethernet header off) into
// the datagram, header from the first.
func reassemble(first, later []byte) []byte {
	b := append(append([]byte(nil), first...), later[20:]...)
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[6], b[7] = 0, 0
	b[10], b[11] = 0, 0
	binary.BigEndian.PutUint16(b[10:], csum16(b[:20], 0))
	return b
}

// checkIPHeader fails t unless the IPv4 header at b has a valid checksum.
func checkIPHeader(t *testing.T, what string, b []byte) {
	t.Helper()
	if csum16(b[:int(b[0]&0xf)*4], 0) != 0 {
		t.Errorf("%s: bad IP header checksum", what)
	}
}

// TestFragments: fragments to old_ip are tunnelled (no L4 needed); to
// new_ip the first fragment carries the L4 fix (checksum, port), later
// ones only the address; a VM's fragmented answer follows its flow, the
// later fragments by the first one's ports (frags).
func TestFragments(t *testing.T) {
	a := newTestHost(t, hostA)
	upA, _ := a.dp.Programs()
	a.dp.SetPeer(toB, true)
	a.dp.SetRedirect(oldIP, toB, vmMAC, true)
	dgram := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolUDP, sport: 5000, dport: 53, payload: 300})
	f1, f2 := fragments(t, dgram, 160)
	t.Run("tunnelled to the peer", func(t *testing.T) {
		for i, f := range [][]byte{f1, f2} {
			ret, out := a.run(t, upA, f)
			if ret != actRedirect || out[14+9] != tunnelProto || !bytes.Equal(out[14+tunnelOverhead:], f[14:]) {
				t.Fatalf("fragment %d: ret %d, not tunnelled unchanged", i+1, ret)
			}
			checkIPHeader(t, "outer", out[14:])
		}
	})

	b := hostBWithVM(t)
	upB, vmB := b.dp.Programs()
	t.Run("delivered from the tunnel", func(t *testing.T) {
		for i, f := range [][]byte{f1, f2} {
			ret, out := b.run(t, upB, tunnel(t, hostA, hostB, f))
			if ret != actRedirect || !bytes.Equal(out[14:], f[14:]) {
				t.Fatalf("fragment %d: ret %d", i+1, ret)
			}
		}
	})
	t.Run("NAT to new_ip", func(t *testing.T) {
		for _, proto := range []layers.IPProtocol{layers.IPProtocolUDP, layers.IPProtocolTCP} {
			d := frame(t, pktSpec{src: clientIP, dst: newIP, proto: proto, sport: 5001, dport: 53, ack: true, payload: 300})
			g1, g2 := fragments(t, d, 160)
			r1, o1 := b.run(t, upB, g1)
			r2, o2 := b.run(t, upB, g2)
			if r1 != actRedirect || r2 != actRedirect {
				t.Fatalf("%s: ret %d %d", proto, r1, r2)
			}
			checkIPHeader(t, "first fragment", o1[14:])
			checkIPHeader(t, "later fragment", o2[14:])
			if !bytes.Equal(o2[34:], g2[34:]) {
				t.Errorf("%s: later fragment's payload changed", proto)
			}
			whole := reassemble(o1[14:], o2[14:])
			wantRewritten(t, proto.String()+" reassembled", append(make([]byte, 14), whole...), d, clientIP, oldIP, 5001, 53)
		}
	})
	t.Run("VM's fragmented answer follows its flow", func(t *testing.T) {
		// NAT flow (client -> new_ip), then the VM's fragmented answer.
		b.run(t, upB, frame(t, pktSpec{src: clientIP, dst: newIP, proto: layers.IPProtocolUDP, sport: 5002, dport: 53}))
		ans := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolUDP, sport: 53, dport: 5002, payload: 1200, srcMAC: vmMAC})
		h1, h2 := fragments(t, ans, 600)
		r1, o1 := b.run(t, vmB, h1)
		r2, o2 := b.run(t, vmB, h2)
		if r1 != actRedirect || r2 != actRedirect {
			t.Fatalf("ret %d %d", r1, r2)
		}
		whole := reassemble(o1[14:], o2[14:])
		wantRewritten(t, "NAT answer reassembled", append(make([]byte, 14), whole...), ans, newIP, clientIP, 53, 5002)
		// A flow through the tunnel: both fragments go back through it.
		b.run(t, upB, tunnel(t, hostA, hostB, frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolUDP, sport: 5003, dport: 53})))
		ans = frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolUDP, sport: 53, dport: 5003, payload: 1200, srcMAC: vmMAC})
		h1, h2 = fragments(t, ans, 600)
		for i, h := range [][]byte{h1, h2} {
			ret, out := b.run(t, vmB, h)
			if ret != actRedirect || out[14+9] != tunnelProto || !bytes.Equal(out[14+tunnelOverhead:], h[14:]) {
				t.Fatalf("tunnel answer fragment %d: ret %d, not tunnelled unchanged", i+1, ret)
			}
		}
	})
}

// icmpError builds an ICMP error (type, code; frag-needed: next-hop mtu)
// from src to dst quoting the first 28 bytes of the IPv4 packet quoted.
func icmpError(t *testing.T, src, dst netip.Addr, typ, code uint8, mtu uint16, quoted []byte, srcMAC net.HardwareAddr) []byte {
	t.Helper()
	if srcMAC == nil {
		srcMAC = nextHop
	}
	eth := &layers.Ethernet{SrcMAC: srcMAC, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: ip4(src), DstIP: ip4(dst)}
	icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, code), Seq: mtu}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, icmp, gopacket.Payload(quoted[:28])); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestICMPErrorsOnTranslatedFlows: an ICMP error to new_ip about a NAT flow
// reaches the VM quoting the packet exactly as the VM sent it (old_ip, its
// port for the client); the VM's own ICMP error about a NAT flow leaves
// from new_ip quoting the packet exactly as the client sent it. Outer IP,
// ICMP, quoted IP and quoted UDP checksums stay right.
func TestICMPErrorsOnTranslatedFlows(t *testing.T) {
	b := hostBWithVM(t)
	up, vmProg := b.dp.Programs()
	router := netip.MustParseAddr("10.0.9.1")
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP} {
		t.Run(proto.String(), func(t *testing.T) {
			const P = 41234
			// A flow through the tunnel holds client:P -> old_ip:80, so the
			// NAT flow from P gets another port P2.
			b.run(t, up, tunnel(t, hostA, hostB, frame(t, pktSpec{src: clientIP, dst: oldIP, proto: proto, sport: P, dport: 80, ack: true})))
			cl := frame(t, pktSpec{src: clientIP, dst: newIP, proto: proto, sport: P, dport: 80, syn: true, payload: 20, df: true})
			_, out := b.run(t, up, cl)
			p2, _ := l4ports(out[14:])
			if p2 == P {
				t.Fatalf("port not translated")
			}
			// The VM's answer (full size, DF), as it leaves host B.
			ans := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: proto, sport: 80, dport: p2, ack: true, payload: 1400, df: true, srcMAC: vmMAC})
			ret, sent := b.run(t, vmProg, ans)
			if ret != actRedirect {
				t.Fatalf("answer: ret %d", ret)
			}
			// A router says: fragmentation needed, mtu 1400.
			fn := icmpError(t, router, newIP, 3, 4, 1400, sent[14:], nil)
			ret, got := b.run(t, up, fn)
			if ret != actRedirect || !bytes.Equal(got[0:6], vmMAC) {
				t.Fatalf("frag-needed: ret %d, to %s", ret, net.HardwareAddr(got[0:6]))
			}
			checkIPv4(t, "frag-needed to the VM", got[14:])
			if !bytes.Equal(got[14+16:14+20], ip4(oldIP)) {
				t.Errorf("outer destination %s, want old_ip", net.IP(got[30:34]))
			}
			if icmp := got[34:42]; icmp[0] != 3 || icmp[1] != 4 || binary.BigEndian.Uint16(icmp[6:]) != 1400 {
				t.Errorf("icmp header % x", icmp)
			}
			if q := got[42:70]; !bytes.Equal(q, ans[14:42]) {
				t.Errorf("quoted packet\n got % x\nwant % x (the VM's own)", q, ans[14:42])
			}

			// The VM's own error about the NAT flow (port unreachable,
			// quoting the client's packet as the VM got it).
			vmErr := icmpError(t, oldIP, clientIP, 3, 3, 0, out[14:], vmMAC)
			ret, got = b.run(t, vmProg, vmErr)
			if ret != actRedirect || got[14+9] != 1 {
				t.Fatalf("VM's error: ret %d proto %d (tunnelled?)", ret, got[14+9])
			}
			checkIPv4(t, "VM's error", got[14:])
			if !bytes.Equal(got[14+12:14+16], ip4(newIP)) {
				t.Errorf("VM's error leaves from %s, want new_ip", net.IP(got[26:30]))
			}
			if q := got[42:70]; !bytes.Equal(q, cl[14:42]) {
				t.Errorf("VM's error quotes\n got % x\nwant % x (the client's own)", q, cl[14:42])
			}
			// An error about the tunnel flow goes back through the tunnel.
			tunErr := icmpError(t, oldIP, clientIP, 3, 3, 0, frame(t, pktSpec{src: clientIP, dst: oldIP, proto: proto, sport: P, dport: 80, ack: true})[14:], vmMAC)
			ret, got = b.run(t, vmProg, tunErr)
			if ret != actRedirect || got[14+9] != tunnelProto || !bytes.Equal(got[14+tunnelOverhead:], tunErr[14:]) {
				t.Fatalf("error about the tunnel flow: ret %d, not tunnelled unchanged", ret)
			}
		})
	}
}

// capture opens a packet socket on ifname in the host's namespace; read
// returns the next frame it sees (or fails after a second).
func (h *testHost) capture(t *testing.T, ifname string) func() []byte {
	t.Helper()
	var fd int
	err := netns.Do(h.ns, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1})
	return func() []byte {
		b := make([]byte, 65536)
		n, _, err := unix.Recvfrom(fd, b, 0)
		if err != nil {
			t.Fatalf("capture on %s: %v", ifname, err)
		}
		return b[:n]
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// TestTooBigWithoutDF: a packet to old_ip without DF that does not fit the
// tunnel (1481-1500 bytes with IPIP) is sent as two fragments of the inner
// packet, each in its own tunnel packet; they reassemble to the original.
func TestTooBigWithoutDF(t *testing.T) {
	a := newTestHost(t, hostA)
	up, _ := a.dp.Programs()
	a.dp.SetPeer(toB, true)
	a.dp.SetRedirect(oldIP, toB, vmMAC, true)
	read := a.capture(t, "u1")
	for _, c := range []struct {
		proto   layers.IPProtocol
		payload int
	}{{layers.IPProtocolUDP, 1472}, {layers.IPProtocolTCP, 1441}, {layers.IPProtocolUDP, 1500 - 20 - 8 - tunnelOverhead + 1}} {
		in := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: c.proto, sport: 4000, dport: 53, ack: true, payload: c.payload})
		t.Run(fmt.Sprintf("%s %d bytes", c.proto, len(in)-14), func(t *testing.T) {
			ret, second := a.run(t, up, in)
			if ret != actRedirect {
				c, _ := a.dp.Stats(oldIP)
				t.Fatalf("ret %d, counters %v", ret, c)
			}
			first := read()
			for i, f := range [][]byte{first, second} {
				if f[14+9] != tunnelProto || len(f)-14 > 1500 {
					t.Fatalf("fragment %d: outer proto %d, %d bytes", i+1, f[14+9], len(f)-14)
				}
				checkIPHeader(t, "outer", f[14:])
				checkIPHeader(t, "inner", f[14+tunnelOverhead:])
				if int(binary.BigEndian.Uint16(f[16:])) != len(f)-14 {
					t.Errorf("fragment %d: outer tot_len %d, frame %d", i+1, binary.BigEndian.Uint16(f[16:]), len(f)-14)
				}
			}
			i1, i2 := first[14+tunnelOverhead:], second[14+tunnelOverhead:]
			if binary.BigEndian.Uint16(i1[6:]) != 0x2000 || binary.BigEndian.Uint16(i2[6:])&0x2000 != 0 {
				t.Errorf("fragment fields %#x %#x", binary.BigEndian.Uint16(i1[6:]), binary.BigEndian.Uint16(i2[6:]))
			}
			if got := reassemble(i1, i2); !bytes.Equal(got, in[14:]) {
				t.Errorf("reassembled\n got % x\nwant % x", got[:40], in[14:54])
			}
			checkIPv4(t, "reassembled", reassemble(i1, i2))
		})
	}
	c, _ := a.dp.Stats(oldIP)
	if c["fragmented"] != 3 {
		t.Errorf("fragmented %d, want 3", c["fragmented"])
	}
}

// TestRefusesBigTCP: a device whose GRO builds IPv4 packets over 64 KiB
// (BIG TCP) is refused at attach, naming the device and its setting.
func TestRefusesBigTCP(t *testing.T) {
	h := newTestHost(t, hostA)
	err := netns.Do(h.ns, func() error {
		l, err := netlink.LinkByName("u0")
		if err != nil {
			return err
		}
		return netlink.LinkSetGROIPv4MaxSize(l, 131072)
	})
	if err != nil {
		t.Skipf("cannot set gro_ipv4_max_size here (kernel before 6.3?): %v", err)
	}
	err = netns.Do(h.ns, func() error { return h.dp.Attach(Uplink, "u0") })
	want := `datapath: attach uplink: device "u0" has BIG TCP on (gro_ipv4_max_size 131072 > 65536)`
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("attach: %v\nwant an error starting %q", err, want)
	}
	if err := netns.Do(h.ns, func() error {
		l, _ := netlink.LinkByName("u0")
		return netlink.LinkSetGROIPv4MaxSize(l, 65536)
	}); err != nil {
		t.Fatal(err)
	}
	if err := netns.Do(h.ns, func() error { return h.dp.Attach(Uplink, "u0") }); err != nil {
		t.Fatalf("attach with gro_ipv4_max_size 65536: %v", err)
	}
	netns.Do(h.ns, func() error { return h.dp.Detach("u0") })
}

// TestPeersRetired: a peer's token is accepted while its migration lasts;
// once its last migration is drained the address is forgotten (its packets
// are no longer the datapath's business), and a second migration with the
// same peer keeps its own token working when the first one ends.
func TestPeersRetired(t *testing.T) {
	a := newTestHost(t, hostA)
	up, _ := a.dp.Programs()
	inner := frame(t, pktSpec{src: oldIP, dst: clientIP, proto: layers.IPProtocolUDP, sport: 53, dport: 5353})
	second := Tunnel{Peer: hostB, Token: testToken + 7}
	for _, tun := range []Tunnel{toB, second} {
		if err := a.dp.SetPeer(tun, true); err != nil {
			t.Fatal(err)
		}
	}
	want := func(what string, token uint64, ret uint32) {
		t.Helper()
		if got, _ := a.run(t, up, tunnelWith(t, hostB, hostA, token, inner)); got != ret {
			t.Errorf("%s: token %#x: ret %d, want %d", what, token, got, ret)
		}
	}
	want("both migrations", testToken, actRedirect)
	want("both migrations", second.Token, actRedirect)
	if err := a.dp.SetPeer(toB, false); err != nil {
		t.Fatal(err)
	}
	want("first drained", testToken, actShot)
	want("first drained", second.Token, actRedirect)
	if err := a.dp.SetPeer(second, false); err != nil {
		t.Fatal(err)
	}
	want("both drained", second.Token, actOK)
	var k bpf.DatapathPeerKey
	var v uint32
	if a.dp.objs.Peers.Iterate().Next(&k, &v) {
		t.Errorf("peers left after the last migration: %+v", k)
	}
	if err := a.dp.SetPeer(Tunnel{Peer: hostB}, true); err == nil {
		t.Errorf("token 0 accepted")
	}
}

// TestIPv6Refused: IPv6 addresses are refused with an error naming them,
// never a panic (the datapath is IPv4 only).
func TestIPv6Refused(t *testing.T) {
	a := newTestHost(t, hostA)
	v6 := netip.MustParseAddr("2001:db8::10")
	for name, err := range map[string]error{
		"SetRedirect":      a.dp.SetRedirect(v6, toB, vmMAC, false),
		"SetRedirect peer": a.dp.SetRedirect(oldIP, Tunnel{Peer: v6, Token: 1}, vmMAC, false),
		"SetVM":            a.dp.SetVM(VM{OldIP: v6, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC}),
		"SetVM new":        a.dp.SetVM(VM{OldIP: oldIP, NewIP: v6, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC}),
		"SetPeer":          a.dp.SetPeer(Tunnel{Peer: v6, Token: 1}, true),
		"RemoveVM new":     a.dp.RemoveVM(oldIP, v6),
	} {
		if err == nil || !strings.Contains(err.Error(), `"2001:db8::10": want IPv4`) {
			t.Errorf("%s: %v, want an error naming the IPv6 address", name, err)
		}
	}
	if _, err := a.dp.Stats(v6); err == nil {
		t.Errorf("Stats of an IPv6 address: no error")
	}
	if _, _, err := a.dp.Idle(v6); err == nil {
		t.Errorf("Idle of an IPv6 address: no error")
	}
	if _, err := Load(Options{LocalIP: v6}); err == nil {
		t.Errorf("Load with an IPv6 local address: no error")
	}
}

// TestFlowsMovedFromOldHost: before the switch host A notes the VM's flows
// (a client's connection closed there, the VM holding it in TIME_WAIT);
// MoveFlows hands them to host B, whose NAT then gives a new flow from the
// same client port another port.
func TestFlowsMovedFromOldHost(t *testing.T) {
	a := newTestHost(t, hostA)
	upA, _ := a.dp.Programs()
	a.dp.SetPeer(toB, true)
	a.dp.SetRedirect(oldIP, toB, vmMAC, false)
	const P = 45001
	fin := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: P, dport: 7, ack: true, fin: true})
	if ret, out := a.run(t, upA, fin); ret != actOK || !bytes.Equal(out, fin) {
		t.Fatalf("redirect off: ret %d, changed %v", ret, !bytes.Equal(out, fin))
	}
	b := hostBWithVM(t)
	upB, _ := b.dp.Programs()
	n, err := MoveFlows(a.dp, b.dp, oldIP)
	if err != nil || n != 1 {
		t.Fatalf("MoveFlows: %d, %v; want 1 flow", n, err)
	}
	if n, _ := MoveFlows(a.dp, b.dp, oldIP); n != 0 {
		t.Errorf("host A kept %d flows after moving them", n)
	}
	syn := frame(t, pktSpec{src: clientIP, dst: newIP, proto: layers.IPProtocolTCP, sport: P, dport: 7, syn: true})
	ret, out := b.run(t, upB, syn)
	if ret != actRedirect {
		t.Fatalf("ret %d", ret)
	}
	gp, _ := l4ports(out[14:])
	if gp == P {
		t.Fatalf("new flow from port %d reached the VM on the tuple it holds in TIME_WAIT", P)
	}
	wantRewritten(t, "dnat", out, syn, clientIP, oldIP, gp, 7)
}
