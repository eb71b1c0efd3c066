package datapath

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"

	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
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
		tcp := &layers.TCP{SrcPort: layers.TCPPort(s.sport), DstPort: layers.TCPPort(s.dport), SYN: s.syn, ACK: s.ack, Seq: 1000, Window: 64240}
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
	if err := a.dp.SetPeer(hostB, true); err != nil {
		t.Fatal(err)
	}
	if err := a.dp.SetRedirect(oldIP, hostB, vmMAC, false); err != nil {
		t.Fatal(err)
	}
	toVM := frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 40000, dport: 80, ack: true, payload: 100, df: true})

	t.Run("redirect off passes", func(t *testing.T) {
		ret, out := a.run(t, up, toVM)
		if ret != actOK || !bytes.Equal(out, toVM) {
			t.Fatalf("ret %d, changed=%v", ret, !bytes.Equal(out, toVM))
		}
	})
	if err := a.dp.SetRedirect(oldIP, hostB, vmMAC, true); err != nil {
		t.Fatal(err)
	}
	t.Run("encap", func(t *testing.T) {
		ret, out := a.run(t, up, toVM)
		if ret != actRedirect {
			t.Fatalf("ret %d", ret)
		}
		if len(out) != len(toVM)+20 {
			t.Fatalf("len %d, want %d", len(out), len(toVM)+20)
		}
		if !bytes.Equal(out[0:6], nextHop) || !bytes.Equal(out[6:12], a.ifi.HardwareAddr) {
			t.Errorf("ethernet %s <- %s, want %s <- %s", net.HardwareAddr(out[0:6]), net.HardwareAddr(out[6:12]), nextHop, a.ifi.HardwareAddr)
		}
		outer := out[14:34]
		want := []byte{0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0, 10, 1, 0, 2, 10, 2, 0, 2}
		binary.BigEndian.PutUint16(want[2:], uint16(len(toVM)-14+20))
		binary.BigEndian.PutUint16(want[10:], binary.BigEndian.Uint16(outer[10:]))
		if !bytes.Equal(outer, want) {
			t.Errorf("outer header\n got % x\nwant % x", outer, want)
		}
		checkIPv4(t, "outer", out[14:])
		if !bytes.Equal(out[34:], toVM[14:]) {
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
		inner := out[34:]
		checkIPv4(t, "inner SYN", inner)
		// options start after the 20-byte TCP header: NOP, then kind 2 len 4 MSS.
		if got := binary.BigEndian.Uint16(inner[20+20+3:]); got != 1440 {
			t.Errorf("MSS %d, want 1440", got)
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
		if icmp[0] != 3 || icmp[1] != 4 || binary.BigEndian.Uint16(icmp[6:]) != 1480 {
			t.Errorf("icmp % x, want type 3 code 4 mtu 1480", icmp[:8])
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
		tun := ipip(t, hostB, hostA, inner)
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
		tun := ipip(t, netip.MustParseAddr("10.9.9.9"), hostA, inner)
		ret, out := a.run(t, up, tun)
		if ret != actOK || !bytes.Equal(out, tun) {
			t.Fatalf("ret %d", ret)
		}
	})
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"ip options", frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolTCP, sport: 1, dport: 80, options: true})},
		{"fragment", frame(t, pktSpec{src: clientIP, dst: oldIP, proto: layers.IPProtocolUDP, sport: 1, dport: 53, frag: true, payload: 100})},
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
	b.dp.SetPeer(hostA, true)
	if err := b.dp.SetVM(VM{OldIP: oldIP, NewIP: newIP, Gateway: gwA, GatewayMAC: gwMAC, MAC: vmMAC, Tap: b.ifi.Index, Peer: hostA}); err != nil {
		t.Fatal(err)
	}
	t.Run("decap delivers to the VM", func(t *testing.T) {
		tun := ipip(t, hostA, hostB, toVM)
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
		if ret != actRedirect || out[14+9] != 4 || !bytes.Equal(out[14+12:14+16], ip4(hostB)) || !bytes.Equal(out[14+16:14+20], ip4(hostA)) {
			t.Fatalf("ret %d outer % x", ret, out[14:34])
		}
		if !bytes.Equal(out[34:], reply[14:]) {
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

func ipip(t *testing.T, src, dst netip.Addr, inner []byte) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: nextHop, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolIPv4, SrcIP: ip4(src), DstIP: ip4(dst), Flags: layers.IPv4DontFragment}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, gopacket.Payload(inner[14:])); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
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
	must(first.SetRedirect(oldIP, hostB, vmMAC, true))
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
	}
	must(second.objs.Redirects.Lookup(be32(oldIP), &r))
	if r.Mode != 1 || r.Peer != be32(hostB) {
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
