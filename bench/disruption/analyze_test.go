package main

import (
	"bytes"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

var (
	cliIP = net.IP{10, 0, 0, 2}
	vmIP  = net.IP{10, 1, 0, 10}
)

// pcapBuilder writes Ethernet frames as the client's capture would,
// cut to 128 bytes.
type pcapBuilder struct {
	t   *testing.T
	buf bytes.Buffer
	w   *pcapgo.Writer
	t0  time.Time
}

func newPcap(t *testing.T) *pcapBuilder {
	b := &pcapBuilder{t: t, t0: time.Unix(1000, 0)}
	b.w = pcapgo.NewWriter(&b.buf)
	if err := b.w.WriteFileHeader(128, layers.LinkTypeEthernet); err != nil {
		t.Fatal(err)
	}
	return b
}

func (b *pcapBuilder) write(at time.Duration, ls ...gopacket.SerializableLayer) {
	sb := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(sb, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		b.t.Fatal(err)
	}
	data := sb.Bytes()
	ci := gopacket.CaptureInfo{Timestamp: b.t0.Add(at), Length: len(data), CaptureLength: min(len(data), 128)}
	if err := b.w.WritePacket(ci, data[:ci.CaptureLength]); err != nil {
		b.t.Fatal(err)
	}
}

func eth() *layers.Ethernet {
	return &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
}

// tcp writes one segment; toSrv: client to server.
func (b *pcapBuilder) tcp(at time.Duration, toSrv bool, cport, sport uint16, seq uint32, flags string, payload []byte) {
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: vmIP, DstIP: cliIP}
	t := &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: layers.TCPPort(cport), Seq: seq, Window: 1000}
	if toSrv {
		ip.SrcIP, ip.DstIP = cliIP, vmIP
		t.SrcPort, t.DstPort = t.DstPort, t.SrcPort
	}
	for _, f := range flags {
		switch f {
		case 'S':
			t.SYN = true
		case 'A':
			t.ACK = true
		case 'R':
			t.RST = true
		}
	}
	t.SetNetworkLayerForChecksum(ip)
	b.write(at, eth(), ip, t, gopacket.Payload(payload))
}

func (b *pcapBuilder) icmp(at time.Duration, reply bool, id, seq uint16) {
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: cliIP, DstIP: vmIP}
	ic := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: id, Seq: seq}
	if reply {
		ip.SrcIP, ip.DstIP = vmIP, cliIP
		ic.TypeCode = layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoReply, 0)
	}
	b.write(at, eth(), ip, ic, gopacket.Payload([]byte("vmhop")))
}

func reqs(from, n int) []byte {
	var out []byte
	for i := range n {
		out = binary.BigEndian.AppendUint64(out, uint64(from+i))
	}
	return out
}

// TestAnalyze: echo latencies come from stream offsets (a reply cut short
// by the capture, or coalesced after a stall, still answers its
// requests); retransmissions, those by timeout, resets, payload
// arrivals, ICMP latencies and bytes are counted per connection.
func TestAnalyze(t *testing.T) {
	ms := time.Millisecond
	b := newPcap(t)
	const cp, isn, risn = 40000, 1000, 5000
	b.tcp(0, true, cp, 7, isn, "S", nil)
	b.tcp(20*ms, false, cp, 7, risn, "SA", nil)
	b.tcp(30*ms, true, cp, 7, isn+1, "A", reqs(1, 1))
	b.tcp(70*ms, false, cp, 7, risn+1, "A", reqs(1, 1)) // 40 ms
	b.tcp(80*ms, true, cp, 7, isn+9, "A", reqs(2, 1))
	b.tcp(90*ms, true, cp, 7, isn+17, "A", reqs(3, 1))
	b.tcp(330*ms, true, cp, 7, isn+9, "A", reqs(2, 2)) // retransmitted by timeout (250 ms after)
	// Twenty requests' replies in one segment: the capture keeps 62 bytes
	// of its payload, the offsets answer all of them.
	b.tcp(100*ms, true, cp, 7, isn+25, "A", reqs(4, 20))
	b.tcp(400*ms, false, cp, 7, risn+9, "A", reqs(2, 22))
	b.tcp(410*ms, false, cp, 7, risn+9, "A", reqs(2, 2)) // a duplicate: fast, not a timeout
	b.tcp(500*ms, true, 40001, 80, 7000, "R", nil)
	b.tcp(510*ms, false, 40002, 80, 9000, "A", []byte("bulk data"))
	b.icmp(600*ms, false, 1, 1)
	b.icmp(612*ms, true, 1, 1)
	b.icmp(620*ms, false, 1, 2)
	c, err := Analyze(&b.buf, map[uint16]bool{7: true, 80: true}, 7)
	if err != nil {
		t.Fatal(err)
	}
	if c.Packets != 15 || len(c.Conns) != 3 {
		t.Fatalf("%d packets, %d connections, want 15 and 3", c.Packets, len(c.Conns))
	}
	if c.Retransmits != 2 || c.RTORetransmits != 1 || c.Resets != 1 {
		t.Errorf("retransmits %d (by timeout %d), resets %d; want 2 (1), 1", c.Retransmits, c.RTORetransmits, c.Resets)
	}
	if cs := c.Conns[ConnKey{cp, 7}]; cs.Retransmits != 2 || cs.ServerPort != 7 || cs.Server.String() != "10.1.0.10" {
		t.Errorf("echo conn %+v", cs)
	}
	if a := c.Conns[ConnKey{40002, 80}].Arrivals; len(a) != 1 || !a[0].Equal(b.t0.Add(510*ms)) {
		t.Errorf("bulk arrivals %v", a)
	}
	// New bytes in order: the reply at 70 ms and the big one at 400 ms;
	// the duplicate at 410 ms is no progress.
	if p := c.Conns[ConnKey{cp, 7}].Progress; len(p) != 2 || !p[0].Equal(b.t0.Add(70*ms)) || !p[1].Equal(b.t0.Add(400*ms)) {
		t.Errorf("echo progress %v", p)
	}
	if c.Conns[ConnKey{cp, 7}].RetransmitsToServer != 1 {
		t.Errorf("client retransmits %d, want 1", c.Conns[ConnKey{cp, 7}].RetransmitsToServer)
	}
	var echo []time.Duration
	var icmp []time.Duration
	for _, s := range c.Samples {
		if s.Kind == "echo" {
			echo = append(echo, s.Latency)
		} else {
			icmp = append(icmp, s.Latency)
		}
	}
	if len(echo) != 23 || echo[0] != 40*ms || echo[1] != 320*ms || echo[2] != 310*ms || echo[3] != 300*ms || echo[22] != 300*ms {
		t.Errorf("echo latencies %v (%d), want 40ms 320ms 310ms 300ms...", echo[:min(5, len(echo))], len(echo))
	}
	if len(icmp) != 2 || icmp[0] != 12*ms || icmp[1] != -1 {
		t.Errorf("icmp latencies %v, want [12ms -1]", icmp)
	}
	var wire int64
	for _, cs := range c.Conns {
		wire += cs.WireBytes
	}
	if wire == 0 || wire >= c.WireBytes {
		t.Errorf("tcp wire bytes %d of %d", wire, c.WireBytes)
	}
}
