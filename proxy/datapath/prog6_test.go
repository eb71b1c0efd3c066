package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/vmhop/vmhop/internal/netns"
)

// A dual-stack VM's IPv6 side. The VM's IPv6 gateway is link-local, as
// IPv6 default routes usually are.
var (
	oldIP6    = netip.MustParseAddr("fd00:1::10")
	newIP6    = netip.MustParseAddr("fd00:2::10")
	gw6       = netip.MustParseAddr("fe80::1")
	client6   = netip.MustParseAddr("fd00:3::2")
	router6   = netip.MustParseAddr("fd00:9::1")
	vmLinkLoc = netip.MustParseAddr("fe80::5054:ff:feaa:bbcc")
)

// addIPv6 gives a test host an IPv6 address (fd00:N::2/64 for IPv4
// 10.N.0.2), forwarding, and a route to fd00::/16 via fd00:N::1 at the
// router's fixed MAC, so the programs' IPv6 FIB lookups give known answers.
func (h *testHost) addIPv6(t *testing.T, local netip.Addr) {
	t.Helper()
	n := local.As4()[1]
	addr := netip.AddrFrom16([16]byte{0: 0xfd, 3: n, 15: 2})
	gw := netip.AddrFrom16([16]byte{0: 0xfd, 3: n, 15: 1})
	err := netns.Do(h.ns, func() error {
		for _, f := range []string{"/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/net/ipv6/conf/u0/forwarding"} {
			if err := os.WriteFile(f, []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"-6", "addr", "add", addr.String() + "/64", "dev", "u0", "nodad"},
		{"-6", "neigh", "add", gw.String(), "lladdr", nextHop.String(), "dev", "u0", "nud", "permanent"},
		{"-6", "route", "add", "fd00::/16", "via", gw.String(), "dev", "u0"},
	} {
		if _, err := netns.Run(context.Background(), h.ns, "ip", args...); err != nil {
			t.Fatal(err)
		}
	}
}

type pkt6Spec struct {
	src, dst     netip.Addr
	proto        layers.IPProtocol
	sport, dport uint16
	syn, ack     bool
	echoReply    bool // ICMPv6: an echo reply (id: dport) instead of a request (id: sport)
	mss          uint16
	payload      int
	srcMAC       net.HardwareAddr
}

// frame6 builds an Ethernet/IPv6 frame with valid checksums.
func frame6(t *testing.T, s pkt6Spec) []byte {
	t.Helper()
	src := s.srcMAC
	if src == nil {
		src = nextHop
	}
	eth := &layers.Ethernet{SrcMAC: src, DstMAC: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}, EthernetType: layers.EthernetTypeIPv6}
	ip := &layers.IPv6{Version: 6, TrafficClass: 0x28, FlowLabel: 0x12345, HopLimit: 63, NextHeader: s.proto,
		SrcIP: s.src.AsSlice(), DstIP: s.dst.AsSlice()}
	payload := gopacket.Payload(bytes.Repeat([]byte{0xab}, s.payload))
	ls := []gopacket.SerializableLayer{eth, ip}
	switch s.proto {
	case layers.IPProtocolTCP:
		tcp := &layers.TCP{SrcPort: layers.TCPPort(s.sport), DstPort: layers.TCPPort(s.dport), SYN: s.syn, ACK: s.ack, Seq: 1000, Window: 64240}
		if s.mss != 0 {
			tcp.Options = []layers.TCPOption{{OptionType: layers.TCPOptionKindNop}, {OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: binary.BigEndian.AppendUint16(nil, s.mss)}}
		}
		tcp.SetNetworkLayerForChecksum(ip)
		ls = append(ls, tcp)
	case layers.IPProtocolUDP:
		udp := &layers.UDP{SrcPort: layers.UDPPort(s.sport), DstPort: layers.UDPPort(s.dport)}
		udp.SetNetworkLayerForChecksum(ip)
		ls = append(ls, udp)
	case layers.IPProtocolICMPv6:
		icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(128, 0)}
		echo := &layers.ICMPv6Echo{Identifier: s.sport, SeqNumber: 1}
		if s.echoReply {
			icmp.TypeCode = layers.CreateICMPv6TypeCode(129, 0)
			echo.Identifier = s.dport
		}
		icmp.SetNetworkLayerForChecksum(ip)
		ls = append(ls, icmp, echo)
	}
	ls = append(ls, payload)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// icmp6Msg builds an ICMPv6 message frame (type, code, then body after the
// 4-byte header) with a valid checksum.
func icmp6Msg(t *testing.T, src, dst netip.Addr, hop uint8, typ, code uint8, body []byte, srcMAC net.HardwareAddr) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: srcMAC, DstMAC: net.HardwareAddr{0x33, 0x33, 0xff, 0, 0, 1}, EthernetType: layers.EthernetTypeIPv6}
	ip := &layers.IPv6{Version: 6, HopLimit: hop, NextHeader: layers.IPProtocolICMPv6, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, code)}
	icmp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, icmp, gopacket.Payload(body)); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// neighSolicit is a neighbour solicitation for target from src (MAC from).
func neighSolicit(t *testing.T, src, target netip.Addr, from net.HardwareAddr) []byte {
	body := append(make([]byte, 4), target.AsSlice()...)
	body = append(body, 1, 1) // source link-layer address option
	body = append(body, from...)
	return icmp6Msg(t, src, target, 255, 135, 0, body, from)
}

// icmp6Error is an ICMPv6 error (dest unreachable, packet too big: mtu)
// quoting quoted (an IPv6 packet) in full.
func icmp6Error(t *testing.T, src, dst netip.Addr, typ, code uint8, mtu uint32, quoted []byte, srcMAC net.HardwareAddr) []byte {
	return icmp6Msg(t, src, dst, 64, typ, code, append(binary.BigEndian.AppendUint32(nil, mtu), quoted...), srcMAC)
}

// checkIPv6 fails t unless the IPv6 packet at b has a valid TCP, UDP or
// ICMPv6 checksum (pseudo-header included) and a payload length that fits.
func checkIPv6(t *testing.T, what string, b []byte) {
	t.Helper()
	if b[0]>>4 != 6 {
		t.Fatalf("%s: version %d", what, b[0]>>4)
	}
	plen := int(binary.BigEndian.Uint16(b[4:]))
	if 40+plen > len(b) {
		t.Fatalf("%s: payload length %d > %d bytes", what, plen, len(b)-40)
	}
	var ph uint32
	for i := 8; i < 40; i += 2 {
		ph += uint32(b[i])<<8 | uint32(b[i+1])
	}
	ph += uint32(plen) + uint32(b[6])
	if csum16(b[40:40+plen], ph) != 0 {
		t.Errorf("%s: bad L4 checksum (next header %d)", what, b[6])
	}
}

func addr6(b []byte) netip.Addr { return netip.AddrFrom16([16]byte(b[:16])) }

// ports6 returns the TCP/UDP ports of IPv6 packet ip (ICMPv6 echo: the id as both).
func ports6(ip []byte) (uint16, uint16) {
	l4 := ip[40:]
	if ip[6] == 58 {
		id := binary.BigEndian.Uint16(l4[4:])
		return id, id
	}
	return binary.BigEndian.Uint16(l4[0:]), binary.BigEndian.Uint16(l4[2:])
}

// wantRewritten6 fails t unless out (a frame) is in with only the given
// addresses and ports changed and a valid checksum.
func wantRewritten6(t *testing.T, what string, out, in []byte, src, dst netip.Addr, sport, dport uint16) {
	t.Helper()
	ip := out[14:]
	checkIPv6(t, what, ip)
	if s, d := addr6(ip[8:]), addr6(ip[24:]); s != src || d != dst {
		t.Errorf("%s: %s -> %s, want %s -> %s", what, s, d, src, dst)
	}
	if s, d := ports6(ip); s != sport || d != dport {
		t.Errorf("%s: ports %d -> %d, want %d -> %d", what, s, d, sport, dport)
	}
	norm := func(b []byte) []byte {
		c := append([]byte(nil), b[14:]...)
		copy(c[8:40], make([]byte, 32))
		l4 := c[40:]
		switch c[6] {
		case 6:
			copy(l4[0:4], make([]byte, 4))
			copy(l4[16:18], []byte{0, 0})
		case 17:
			copy(l4[0:4], make([]byte, 4))
			copy(l4[6:8], []byte{0, 0})
		case 58:
			copy(l4[2:6], make([]byte, 4))
		}
		return c
	}
	if !bytes.Equal(norm(out), norm(in)) {
		t.Errorf("%s: more than addresses, ports and checksums changed:\n got % x\nwant % x", what, norm(out), norm(in))
	}
}

// wantNA fails t unless out is a neighbour advertisement from target at
// mac to dst (MAC dstMAC), solicited and override (and router if router),
// with a valid checksum.
func wantNA(t *testing.T, what string, ret uint32, out []byte, target, dst netip.Addr, mac, dstMAC net.HardwareAddr, router bool) {
	t.Helper()
	if ret != actRedirect || len(out) != 14+40+32 {
		t.Fatalf("%s: ret %d, %d bytes", what, ret, len(out))
	}
	if !bytes.Equal(out[0:6], dstMAC) || !bytes.Equal(out[6:12], mac) || binary.BigEndian.Uint16(out[12:]) != 0x86dd {
		t.Errorf("%s: ethernet % x", what, out[:14])
	}
	ip := out[14:]
	checkIPv6(t, what, ip)
	flags := byte(0x60)
	if router {
		flags |= 0x80
	}
	if ip[7] != 255 || ip[6] != 58 || addr6(ip[8:]) != target || addr6(ip[24:]) != dst {
		t.Errorf("%s: ip hop %d nh %d %s -> %s", what, ip[7], ip[6], addr6(ip[8:]), addr6(ip[24:]))
	}
	na := ip[40:]
	if na[0] != 136 || na[1] != 0 || na[4] != flags || addr6(na[8:]) != target || na[24] != 2 || na[25] != 1 || !bytes.Equal(na[26:32], mac) {
		t.Errorf("%s: advertisement % x (want flags %#x, target %s, option mac %s)", what, na, flags, target, mac)
	}
}

// hostBWithVM6 is host B with the dual-stack VM moved in.
func hostBWithVM6(t *testing.T) *testHost {
	t.Helper()
	b := newTestHost(t, hostB)
	b.addIPv6(t, hostB)
	if err := b.dp.SetPeer(toA, true); err != nil {
		t.Fatal(err)
	}
	vm := VM{OldIP: oldIP, NewIP: newIP, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC, Tap: b.ifi.Index, Peer: hostA, Token: testToken,
		OldIP6: oldIP6, NewIP6: newIP6, Gateway6: gw6}
	if err := b.dp.SetVM(vm); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestIPv6AtOldHost: host A tunnels packets for old_ip6 to B inside the
// IPv4 tunnel once the redirect is on, answers neighbour solicitations for
// old_ip6, clamps SYNs to the tunnel, answers too-big packets with ICMPv6
// packet too big, and relays the VM's IPv6 replies from the tunnel to the
// client. Counters are the VM's IPv4 address's.
func TestIPv6AtOldHost(t *testing.T) {
	a := newTestHost(t, hostA)
	a.addIPv6(t, hostA)
	up, _ := a.dp.Programs()
	if err := a.dp.SetPeer(toB, true); err != nil {
		t.Fatal(err)
	}
	if err := a.dp.SetRedirect6(oldIP6, oldIP, toB, vmMAC, false); err != nil {
		t.Fatal(err)
	}
	toVM := frame6(t, pkt6Spec{src: client6, dst: oldIP6, proto: layers.IPProtocolTCP, sport: 40000, dport: 7, ack: true, payload: 100})
	if ret, out := a.run(t, up, toVM); ret != actOK || !bytes.Equal(out, toVM) {
		t.Fatalf("redirect off: ret %d, changed %v", ret, !bytes.Equal(out, toVM))
	}
	if ret, out := a.run(t, up, neighSolicit(t, client6, oldIP6, nextHop)); ret != actOK || out[14+40] != 135 {
		t.Fatalf("solicitation with the redirect off: ret %d, answered", ret)
	}
	if err := a.dp.SetRedirect6(oldIP6, oldIP, toB, vmMAC, true); err != nil {
		t.Fatal(err)
	}
	t.Run("encap", func(t *testing.T) {
		ret, out := a.run(t, up, toVM)
		if ret != actRedirect || len(out) != len(toVM)+tunnelOverhead {
			t.Fatalf("ret %d, %d bytes, want %d", ret, len(out), len(toVM)+tunnelOverhead)
		}
		if !bytes.Equal(out[0:6], nextHop) || binary.BigEndian.Uint16(out[12:]) != 0x0800 {
			t.Errorf("ethernet % x, want to the router, IPv4", out[:14])
		}
		outer := out[14:]
		checkIPHeader(t, "outer", outer)
		if outer[9] != tunnelProto || !bytes.Equal(outer[12:16], ip4(hostA)) || !bytes.Equal(outer[16:20], ip4(hostB)) ||
			binary.BigEndian.Uint16(outer[22:]) != tunnelPort || binary.NativeEndian.Uint64(outer[28:]) != testToken ||
			int(binary.BigEndian.Uint16(outer[2:])) != len(toVM)-14+tunnelOverhead || outer[1] != 0x28 {
			t.Errorf("outer header % x (want tos 0x28: the traffic class)", outer[:tunnelOverhead])
		}
		if !bytes.Equal(out[14+tunnelOverhead:], toVM[14:]) {
			t.Errorf("inner IPv6 packet changed")
		}
		c, _ := a.dp.Stats(oldIP)
		if c["encap_packets"] != 1 || c["encap_bytes"] != uint64(len(toVM)) {
			t.Errorf("counters of %s: %v", oldIP, c)
		}
		if _, ok, _ := a.dp.Idle(oldIP); !ok {
			t.Errorf("no drain signal for the IPv6 side")
		}
	})
	t.Run("neighbour solicitation for old_ip6", func(t *testing.T) {
		ret, out := a.run(t, up, neighSolicit(t, router6, oldIP6, nextHop))
		wantNA(t, "advertisement", ret, out, oldIP6, router6, vmMAC, nextHop, false)
	})
	t.Run("SYN MSS clamped", func(t *testing.T) {
		syn := frame6(t, pkt6Spec{src: client6, dst: oldIP6, proto: layers.IPProtocolTCP, sport: 40001, dport: 7, syn: true, mss: 1440})
		ret, out := a.run(t, up, syn)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		inner := out[14+tunnelOverhead:]
		checkIPv6(t, "inner SYN", inner)
		if got := binary.BigEndian.Uint16(inner[40+20+3:]); got != 1500-tunnelOverhead-60 {
			t.Errorf("MSS %d, want %d", got, 1500-tunnelOverhead-60)
		}
	})
	t.Run("too big gets packet too big", func(t *testing.T) {
		big := frame6(t, pkt6Spec{src: client6, dst: oldIP6, proto: layers.IPProtocolTCP, sport: 40000, dport: 7, ack: true, payload: 1440})
		ret, out := a.run(t, up, big)
		if ret != actRedirect || len(out) != 14+40+8+48 {
			t.Fatalf("ret %d, %d bytes", ret, len(out))
		}
		if !bytes.Equal(out[0:6], big[6:12]) || !bytes.Equal(out[6:12], big[0:6]) {
			t.Errorf("ethernet not swapped")
		}
		ip := out[14:]
		checkIPv6(t, "packet too big", ip)
		if addr6(ip[8:]) != oldIP6 || addr6(ip[24:]) != client6 || ip[6] != 58 {
			t.Errorf("%s -> %s nh %d", addr6(ip[8:]), addr6(ip[24:]), ip[6])
		}
		if m := ip[40:48]; m[0] != 2 || m[1] != 0 || binary.BigEndian.Uint32(m[4:]) != 1500-tunnelOverhead {
			t.Errorf("icmpv6 header % x, want type 2, mtu %d", m, 1500-tunnelOverhead)
		}
		if !bytes.Equal(ip[48:], big[14:14+48]) {
			t.Errorf("quote\n got % x\nwant % x", ip[48:], big[14:62])
		}
		if c, _ := a.dp.Stats(oldIP); c["icmp_too_big"] != 1 {
			t.Errorf("counters %v", c)
		}
	})
	t.Run("the VM's reply relayed to the client", func(t *testing.T) {
		reply := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: layers.IPProtocolTCP, sport: 7, dport: 40000, ack: true, payload: 50})
		ret, out := a.run(t, up, tunnel(t, hostB, hostA, reply))
		if ret != actRedirect || len(out) != len(reply) {
			t.Fatalf("ret %d, %d bytes", ret, len(out))
		}
		if !bytes.Equal(out[0:6], nextHop) || !bytes.Equal(out[6:12], a.ifi.HardwareAddr) || binary.BigEndian.Uint16(out[12:]) != 0x86dd {
			t.Errorf("ethernet % x", out[:14])
		}
		if !bytes.Equal(out[14:], reply[14:]) {
			t.Errorf("reply changed")
		}
	})
	if err := a.dp.RemoveRedirect(oldIP6); err != nil {
		t.Fatal(err)
	}
	if ret, out := a.run(t, up, toVM); ret != actOK || !bytes.Equal(out, toVM) {
		t.Fatalf("after RemoveRedirect: ret %d", ret)
	}
}

// TestIPv6AtNewHost: host B delivers tunnelled IPv6 packets to the VM,
// translates new_ip6 <-> old_ip6 (TCP, UDP, ICMPv6 echo; checksums with
// the pseudo-header), translates the client port when a tunnel flow holds
// the guest 4-tuple, sends the VM's packets on other flows back through
// the tunnel, and answers neighbour solicitations: for new_ip6 on the
// uplink, and the VM's own for its gateway on the tap.
func TestIPv6AtNewHost(t *testing.T) {
	b := hostBWithVM6(t)
	up, vmProg := b.dp.Programs()
	t.Run("from the tunnel into the tap", func(t *testing.T) {
		in := frame6(t, pkt6Spec{src: client6, dst: oldIP6, proto: layers.IPProtocolTCP, sport: 40000, dport: 7, ack: true, payload: 10})
		ret, out := b.run(t, up, tunnel(t, hostA, hostB, in))
		if ret != actRedirect || !bytes.Equal(out[0:6], vmMAC) || !bytes.Equal(out[6:12], gwMAC) || binary.BigEndian.Uint16(out[12:]) != 0x86dd {
			t.Fatalf("ret %d, ethernet % x", ret, out[:14])
		}
		if !bytes.Equal(out[14:], in[14:]) {
			t.Errorf("inner changed")
		}
		// The VM's answer on that flow goes back through the tunnel.
		back := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: layers.IPProtocolTCP, sport: 7, dport: 40000, ack: true, srcMAC: vmMAC})
		ret, out = b.run(t, vmProg, back)
		if ret != actRedirect || binary.BigEndian.Uint16(out[12:]) != 0x0800 || out[14+9] != tunnelProto ||
			!bytes.Equal(out[14+16:14+20], ip4(hostA)) || !bytes.Equal(out[14+tunnelOverhead:], back[14:]) {
			t.Fatalf("answer not tunnelled back unchanged: ret %d % x", ret, out[:14+tunnelOverhead])
		}
		c, _ := b.dp.Stats(oldIP)
		if c["decap_packets"] != 1 || c["delivered_packets"] != 1 || c["tunnel_back_packets"] != 1 {
			t.Errorf("counters %v", c)
		}
	})
	for _, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP, layers.IPProtocolICMPv6} {
		t.Run("NAT66 "+proto.String(), func(t *testing.T) {
			const P = 41000
			svc := uint16(7)
			if proto == layers.IPProtocolICMPv6 {
				svc = P
			}
			in := frame6(t, pkt6Spec{src: client6, dst: newIP6, proto: proto, sport: P, dport: 7, syn: true, payload: 20})
			ret, out := b.run(t, up, in)
			if ret != actRedirect || !bytes.Equal(out[0:6], vmMAC) {
				t.Fatalf("ret %d to %s", ret, net.HardwareAddr(out[0:6]))
			}
			wantRewritten6(t, "to the VM", out, in, client6, oldIP6, P, svc)
			ans := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: proto, sport: 7, dport: P, ack: true, payload: 20, srcMAC: vmMAC, echoReply: true})
			ret, out = b.run(t, vmProg, ans)
			if ret != actRedirect || !bytes.Equal(out[0:6], nextHop) || !bytes.Equal(out[6:12], b.ifi.HardwareAddr) {
				t.Fatalf("answer: ret %d, ethernet % x", ret, out[:14])
			}
			wantRewritten6(t, "from the VM", out, ans, newIP6, client6, svc, P)
		})
	}
	t.Run("client port translated on a shared tuple", func(t *testing.T) {
		const P = 42000
		tun := frame6(t, pkt6Spec{src: client6, dst: oldIP6, proto: layers.IPProtocolTCP, sport: P, dport: 7, ack: true})
		if ret, _ := b.run(t, up, tunnel(t, hostA, hostB, tun)); ret != actRedirect {
			t.Fatalf("tunnel flow: ret %d", ret)
		}
		syn := frame6(t, pkt6Spec{src: client6, dst: newIP6, proto: layers.IPProtocolTCP, sport: P, dport: 7, syn: true})
		ret, out := b.run(t, up, syn)
		p2, _ := ports6(out[14:])
		if ret != actRedirect || p2 == P {
			t.Fatalf("ret %d, client port %d: not translated", ret, p2)
		}
		wantRewritten6(t, "translated SYN", out, syn, client6, oldIP6, p2, 7)
		// The VM's answers: to P2 leaves from new_ip6 to P; to P (the
		// tunnel flow) goes back through the tunnel.
		ans := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: layers.IPProtocolTCP, sport: 7, dport: p2, syn: true, ack: true, srcMAC: vmMAC})
		ret, out = b.run(t, vmProg, ans)
		if ret != actRedirect {
			t.Fatalf("answer: ret %d", ret)
		}
		wantRewritten6(t, "answer to the translated port", out, ans, newIP6, client6, 7, P)
		back := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: layers.IPProtocolTCP, sport: 7, dport: P, ack: true, srcMAC: vmMAC})
		if ret, out := b.run(t, vmProg, back); ret != actRedirect || out[14+9] != tunnelProto {
			t.Fatalf("tunnel flow's answer: ret %d, not tunnelled", ret)
		}
		if c, _ := b.dp.Stats(oldIP); c["nat_port_translated"] != 1 {
			t.Errorf("counters %v", c)
		}
	})
	t.Run("neighbour solicitations", func(t *testing.T) {
		ret, out := b.run(t, up, neighSolicit(t, router6, newIP6, nextHop))
		wantNA(t, "for new_ip6 on the uplink", ret, out, newIP6, router6, vmMAC, nextHop, false)
		// The guest asks for its gateway from its link-local address.
		ret, out = b.run(t, vmProg, neighSolicit(t, vmLinkLoc, gw6, vmMAC))
		wantNA(t, "for the gateway on the tap", ret, out, gw6, vmLinkLoc, gwMAC, vmMAC, true)
		// ...and for another neighbour of its old subnet: the gateway's MAC, not a router.
		other := netip.MustParseAddr("fd00:1::77")
		ret, out = b.run(t, vmProg, neighSolicit(t, oldIP6, other, vmMAC))
		wantNA(t, "for a neighbour on the tap", ret, out, other, oldIP6, gwMAC, vmMAC, false)
		// Its own address (duplicate address detection comes from ::) passes.
		if ret, _ := b.run(t, vmProg, neighSolicit(t, netip.IPv6Unspecified(), oldIP6, vmMAC)); ret != actOK {
			t.Errorf("duplicate address detection: ret %d, want passed", ret)
		}
	})
	t.Run("extension headers at the NAT pass", func(t *testing.T) {
		in := frame6(t, pkt6Spec{src: client6, dst: newIP6, proto: layers.IPProtocolTCP, sport: 43000, dport: 7, ack: true})
		in[14+6] = 0 // hop-by-hop options next: not parsed
		if ret, out := b.run(t, up, in); ret != actOK || !bytes.Equal(out, in) {
			t.Errorf("ret %d, changed %v", ret, !bytes.Equal(out, in))
		}
	})
}

// TestICMPv6ErrorsOnTranslatedFlows: a packet too big to new_ip6 about a
// NAT flow reaches the VM quoting the packet exactly as the VM sent it
// (old_ip6, its port for the client); the VM's own ICMPv6 error about a
// NAT flow leaves from new_ip6 quoting the packet exactly as the client
// sent it; the VM's too-big packet back into the tunnel gets a packet too
// big from its gateway. ICMPv6 and quoted UDP checksums stay right.
func TestICMPv6ErrorsOnTranslatedFlows(t *testing.T) {
	b := hostBWithVM6(t)
	up, vmProg := b.dp.Programs()
	for i, proto := range []layers.IPProtocol{layers.IPProtocolTCP, layers.IPProtocolUDP} {
		t.Run(proto.String(), func(t *testing.T) {
			P := uint16(44000 + i)
			b.run(t, up, tunnel(t, hostA, hostB, frame6(t, pkt6Spec{src: client6, dst: oldIP6, proto: proto, sport: P, dport: 80, ack: true})))
			cl := frame6(t, pkt6Spec{src: client6, dst: newIP6, proto: proto, sport: P, dport: 80, syn: true, payload: 20})
			_, out := b.run(t, up, cl)
			p2, _ := ports6(out[14:])
			if p2 == P {
				t.Fatalf("port not translated")
			}
			ans := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: proto, sport: 80, dport: p2, ack: true, payload: 1400, srcMAC: vmMAC})
			ret, sent := b.run(t, vmProg, ans)
			if ret != actRedirect {
				t.Fatalf("answer: ret %d", ret)
			}
			// A router: packet too big, mtu 1400, quoting what it got.
			ptb := icmp6Error(t, router6, newIP6, 2, 0, 1400, sent[14:14+200], nextHop)
			ret, got := b.run(t, up, ptb)
			if ret != actRedirect || !bytes.Equal(got[0:6], vmMAC) {
				t.Fatalf("packet too big: ret %d, to %s", ret, net.HardwareAddr(got[0:6]))
			}
			checkIPv6(t, "packet too big to the VM", got[14:])
			if d := addr6(got[14+24:]); d != oldIP6 {
				t.Errorf("destination %s, want old_ip6", d)
			}
			if m := got[54:62]; m[0] != 2 || binary.BigEndian.Uint32(m[4:]) != 1400 {
				t.Errorf("icmpv6 header % x", m)
			}
			if q := got[62 : 62+48]; !bytes.Equal(q, ans[14:14+48]) {
				t.Errorf("quoted packet\n got % x\nwant % x (the VM's own)", q, ans[14:62])
			}
			// The VM's own error (port unreachable) about the NAT flow,
			// quoting the client's packet as the VM got it.
			vmErr := icmp6Error(t, oldIP6, client6, 1, 4, 0, out[14:], vmMAC)
			ret, got = b.run(t, vmProg, vmErr)
			if ret != actRedirect || got[14+6] != 58 {
				t.Fatalf("VM's error: ret %d (tunnelled?)", ret)
			}
			checkIPv6(t, "VM's error", got[14:])
			if s := addr6(got[14+8:]); s != newIP6 {
				t.Errorf("VM's error leaves from %s, want new_ip6", s)
			}
			if q := got[62:]; !bytes.Equal(q[:48], cl[14:62]) {
				t.Errorf("VM's error quotes\n got % x\nwant % x (the client's own)", q[:48], cl[14:62])
			}
		})
	}
	t.Run("too big for the tunnel back", func(t *testing.T) {
		big := frame6(t, pkt6Spec{src: oldIP6, dst: client6, proto: layers.IPProtocolTCP, sport: 7, dport: 45000, ack: true, payload: 1440, srcMAC: vmMAC})
		ret, out := b.run(t, vmProg, big)
		if ret != actRedirect || len(out) != 14+40+8+48 || !bytes.Equal(out[0:6], vmMAC) {
			t.Fatalf("ret %d, %d bytes", ret, len(out))
		}
		ip := out[14:]
		checkIPv6(t, "packet too big to the VM", ip)
		if addr6(ip[8:]) != gw6 || addr6(ip[24:]) != oldIP6 || ip[40] != 2 || binary.BigEndian.Uint32(ip[44:]) != 1500-tunnelOverhead {
			t.Errorf("packet too big % x", ip[:48])
		}
	})
}

// TestIPv6Calls: the IPv6 entries are refused for IPv4 addresses and the
// IPv4 calls for IPv6 ones, by name; RemoveVM of the IPv6 side removes its
// entries, and then IPv6 packets to new_ip6 pass untouched.
func TestIPv6Calls(t *testing.T) {
	b := hostBWithVM6(t)
	up, _ := b.dp.Programs()
	for name, err := range map[string]error{
		"SetRedirect6 old":     b.dp.SetRedirect6(oldIP, oldIP, toA, vmMAC, false),
		"SetRedirect6 counted": b.dp.SetRedirect6(oldIP6, oldIP6, toA, vmMAC, false),
		"SetVM old6":           b.dp.SetVM(VM{OldIP: oldIP, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC, OldIP6: oldIP, Gateway6: gw6}),
		"SetVM gateway6":       b.dp.SetVM(VM{OldIP: oldIP, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC, OldIP6: oldIP6}),
	} {
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	in := frame6(t, pkt6Spec{src: client6, dst: newIP6, proto: layers.IPProtocolUDP, sport: 46000, dport: 7})
	if ret, _ := b.run(t, up, in); ret != actRedirect {
		t.Fatalf("before RemoveVM: ret %d", ret)
	}
	if err := b.dp.RemoveVM(oldIP6, newIP6); err != nil {
		t.Fatal(err)
	}
	if ret, out := b.run(t, up, in); ret != actOK || !bytes.Equal(out, in) {
		t.Fatalf("after RemoveVM: ret %d", ret)
	}
	var tap uint32
	var a [16]byte
	if b.dp.objs.Taps6.Iterate().Next(&tap, &a) {
		t.Errorf("taps6 still holds tap %d", tap)
	}
}
