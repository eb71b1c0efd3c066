package main

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
)

// rtoMin is Linux's minimum retransmission timeout: a segment sent again
// this long or longer after its previous transmission was resent by a
// timer, not by fast retransmit.
const rtoMin = 200 * time.Millisecond

// Sample is one request's reply latency, as the client's capture saw it.
type Sample struct {
	At      time.Time     // when the request left the client
	Latency time.Duration // until its reply arrived; -1: never answered
	Kind    string        // "echo" or "icmp"
}

// ConnStats is one TCP connection (client port) as captured at the client.
type ConnStats struct {
	ServerPort, ClientPort uint16
	Server                 netip.Addr
	Packets                int
	WireBytes              int64       // on-the-wire lengths, both directions
	Retransmits            int         // segments seen again (both directions)
	RTORetransmits         int         // of them, sent >= 200 ms after the previous copy
	Resets                 int         // RST segments (both directions)
	Arrivals               []time.Time // server-to-client segments carrying payload
	// Progress: server-to-client segments that delivered new bytes in
	// order (duplicates and segments beyond a hole left out); only for
	// connections whose handshake was captured.
	Progress []time.Time
	// RetransmitsToServer: of Retransmits, the client's.
	RetransmitsToServer int
}

// Capture is what the client's packet capture holds, decomposed.
type Capture struct {
	Packets        int
	WireBytes      int64
	Retransmits    int
	RTORetransmits int
	Resets         int
	Conns          map[uint16]*ConnStats // by client port
	Samples        []Sample              // echo and ICMP, by send time
	First, Last    time.Time
}

// segKey is a TCP segment's start in one direction of one connection.
type segKey struct {
	port   uint16 // client port
	toSrv  bool
	seq    uint32
	isSync bool
}

// dirState follows one direction of one connection.
type dirState struct {
	started bool
	maxEnd  uint32 // highest sequence number sent so far (seq + len)
}

// echoState follows one echo connection's requests and replies by
// stream offset.
type echoState struct {
	reqBase, repBase   uint32 // initial sequence numbers + 1
	reqKnown, repKnown bool
	sent               []int // request k (bytes 8k..8k+8) -> index in Samples, -1 unseen
	contig             int64 // reply bytes received in order
	done               int64 // requests before this one are answered
	pending            [][2]int64
}

// reply takes reply bytes [from, to) arriving at ts: once they extend what
// arrived in order, every request they complete is answered. It reports
// whether they did (new bytes delivered).
func (e *echoState) reply(from, to int64, ts time.Time, samples []Sample) bool {
	before := e.contig
	e.pending = append(e.pending, [2]int64{from, to})
	for grew := true; grew; {
		grew = false
		for i, r := range e.pending {
			if r[0] <= e.contig {
				if r[1] > e.contig {
					e.contig = r[1]
				}
				e.pending = append(e.pending[:i], e.pending[i+1:]...)
				grew = true
				break
			}
		}
	}
	for ; e.done < int64(len(e.sent)) && (e.done+1)*8 <= e.contig; e.done++ {
		if j := e.sent[e.done]; j >= 0 && samples[j].Latency < 0 {
			samples[j].Latency = ts.Sub(samples[j].At)
		}
	}
	return e.contig > before
}

// seqLess compares sequence numbers modulo 2^32.
func seqLess(a, b uint32) bool { return int32(a-b) < 0 }

// Analyze reads a pcap written at the client (Ethernet frames) and
// decomposes it: per connection (by client port; the client is the side
// whose port is not a server port) packets, bytes, retransmissions,
// retransmission timeouts and resets; payload arrivals from the server;
// echo latencies (requests and replies on echoPort carry 8-byte sequence
// numbers) and ICMP echo latencies (by identifier and sequence).
func Analyze(r io.Reader, serverPorts map[uint16]bool, echoPort uint16) (*Capture, error) {
	pr, err := pcapgo.NewReader(r)
	if err != nil {
		return nil, fmt.Errorf("pcap: %w", err)
	}
	c := &Capture{Conns: map[uint16]*ConnStats{}}
	dirs := map[[2]uint32]*dirState{}
	lastTx := map[segKey]time.Time{}
	streams := map[uint16]*echoState{}
	icmpSent := map[uint32]int{} // id<<16|seq -> index in Samples
	for {
		data, ci, err := pr.ReadPacketData()
		if err == io.EOF {
			break
		}
		if err != nil {
			return c, fmt.Errorf("pcap: %w", err)
		}
		ts := ci.Timestamp
		c.Packets++
		c.WireBytes += int64(ci.Length)
		if c.First.IsZero() {
			c.First = ts
		}
		c.Last = ts
		p := gopacket.NewPacket(data, layers.LayerTypeEthernet, gopacket.DecodeOptions{Lazy: true, NoCopy: true})
		if ic, ok := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4); ok {
			key := uint32(ic.Id)<<16 | uint32(ic.Seq)
			switch ic.TypeCode.Type() {
			case layers.ICMPv4TypeEchoRequest:
				icmpSent[key] = len(c.Samples)
				c.Samples = append(c.Samples, Sample{At: ts, Latency: -1, Kind: "icmp"})
			case layers.ICMPv4TypeEchoReply:
				if i, ok := icmpSent[key]; ok && c.Samples[i].Latency < 0 {
					c.Samples[i].Latency = ts.Sub(c.Samples[i].At)
				}
			}
			continue
		}
		ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
		tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if ip == nil || tcp == nil {
			continue
		}
		toSrv := serverPorts[uint16(tcp.DstPort)]
		cport, sport := uint16(tcp.SrcPort), uint16(tcp.DstPort)
		server := ip.DstIP
		if !toSrv {
			if !serverPorts[uint16(tcp.SrcPort)] {
				continue
			}
			cport, sport, server = uint16(tcp.DstPort), uint16(tcp.SrcPort), ip.SrcIP
		}
		cs := c.Conns[cport]
		if cs == nil {
			a, _ := netip.AddrFromSlice(server.To4())
			cs = &ConnStats{ServerPort: sport, ClientPort: cport, Server: a}
			c.Conns[cport] = cs
		}
		cs.Packets++
		cs.WireBytes += int64(ci.Length)
		if tcp.RST {
			cs.Resets++
			c.Resets++
		}
		// The payload's length from the IP header: the capture is cut short.
		plen := int(ip.Length) - int(ip.IHL)*4 - int(tcp.DataOffset)*4
		seqLen := uint32(max(plen, 0))
		if tcp.SYN || tcp.FIN {
			seqLen++
		}
		dk := [2]uint32{uint32(cport), map[bool]uint32{true: 1, false: 0}[toSrv]}
		ds := dirs[dk]
		if ds == nil {
			ds = &dirState{}
			dirs[dk] = ds
		}
		if seqLen > 0 {
			k := segKey{port: cport, toSrv: toSrv, seq: tcp.Seq, isSync: tcp.SYN}
			end := tcp.Seq + seqLen
			if ds.started && !seqLess(ds.maxEnd, end) { // all of it was sent before
				cs.Retransmits++
				c.Retransmits++
				if toSrv {
					cs.RetransmitsToServer++
				}
				if prev, ok := lastTx[k]; ok && ts.Sub(prev) >= rtoMin {
					cs.RTORetransmits++
					c.RTORetransmits++
				}
			} else {
				ds.maxEnd = end
			}
			ds.started = true
			lastTx[k] = ts
		}
		if !toSrv && plen > 0 {
			cs.Arrivals = append(cs.Arrivals, ts)
		}
		// Every stream by offsets: the server's bytes are delivered when
		// they extend what arrived in order (a duplicate or a segment
		// beyond a hole is no progress). Echo requests are 8 bytes each,
		// echoed in order: a request is answered once the reply stream
		// holds its bytes. By offsets, not payloads: the capture keeps 128
		// bytes of each packet, and segments coalesce after a stall.
		es := streams[cport]
		if es == nil {
			es = &echoState{}
			streams[cport] = es
		}
		if tcp.SYN {
			if toSrv {
				es.reqBase, es.reqKnown = tcp.Seq+1, true
			} else {
				es.repBase, es.repKnown = tcp.Seq+1, true
			}
			continue
		}
		if plen <= 0 || (toSrv && !es.reqKnown) || (!toSrv && !es.repKnown) {
			continue
		}
		if toSrv && sport != echoPort {
			continue
		}
		if toSrv {
			off := int64(tcp.Seq - es.reqBase)
			for k := (off + 7) / 8; (k+1)*8 <= off+int64(plen); k++ {
				for int64(len(es.sent)) <= k {
					es.sent = append(es.sent, -1)
				}
				if es.sent[k] < 0 { // a retransmission keeps its first send
					es.sent[k] = len(c.Samples)
					c.Samples = append(c.Samples, Sample{At: ts, Latency: -1, Kind: "echo"})
				}
			}
			continue
		}
		if es.reply(int64(tcp.Seq-es.repBase), int64(tcp.Seq-es.repBase)+int64(plen), ts, c.Samples) {
			cs.Progress = append(cs.Progress, ts)
		}
	}
	sort.SliceStable(c.Samples, func(i, j int) bool { return c.Samples[i].At.Before(c.Samples[j].At) })
	return c, nil
}

// AnalyzeFile is Analyze of the pcap file at path.
func AnalyzeFile(path string, serverPorts map[uint16]bool, echoPort uint16) (*Capture, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return Analyze(f, serverPorts, echoPort)
}

// Summary is the capture in a few lines (the results' pcap summary).
func (c *Capture) Summary() string {
	byServer := map[uint16][6]int{}
	for _, cs := range c.Conns {
		v := byServer[cs.ServerPort]
		v[0]++
		v[1] += cs.Packets
		v[2] += cs.Retransmits
		v[3] += cs.RTORetransmits
		v[4] += cs.Resets
		v[5] += cs.RetransmitsToServer
		byServer[cs.ServerPort] = v
	}
	var icmp, echo, unanswered int
	for _, s := range c.Samples {
		if s.Kind == "icmp" {
			icmp++
		} else {
			echo++
		}
		if s.Latency < 0 {
			unanswered++
		}
	}
	s := fmt.Sprintf("%d packets, %d bytes on the wire over %s; %d TCP connections; %d retransmitted segments (%d by timeout), %d resets; %d echo requests and %d ICMP echoes, %d unanswered\n",
		c.Packets, c.WireBytes, c.Last.Sub(c.First).Round(time.Millisecond), len(c.Conns), c.Retransmits, c.RTORetransmits, c.Resets, echo, icmp, unanswered)
	sp := make([]int, 0, len(byServer))
	for p := range byServer {
		sp = append(sp, int(p))
	}
	sort.Ints(sp)
	for _, p := range sp {
		v := byServer[uint16(p)]
		s += fmt.Sprintf("  server port %d: %d connections, %d packets, %d retransmitted (%d by the client, %d by timeout), %d resets\n", p, v[0], v[1], v[2], v[5], v[3], v[4])
	}
	return s
}
