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
	Conns          map[ConnKey]*ConnStats
	Samples        []Sample // echo and ICMP, by send time
	First, Last    time.Time
}

// ConnKey names a connection at the client: its port and the server's
// (the client uses one port towards two server ports at once).
type ConnKey struct{ Client, Server uint16 }

// segKey is a TCP segment's start in one direction of one connection.
type segKey struct {
	port   uint16 // client port
	sport  uint16
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

// maxJump bounds how far beyond what is known a segment may start: a
// segment of an earlier connection on a reused client port (or a capture
// that missed the handshake) would otherwise be read as gigabytes ahead.
const maxJump = 64 << 20

// reply takes reply bytes [from, to) arriving at ts: once they extend what
// arrived in order, every request they complete is answered. It reports
// whether they did (new bytes delivered).
func (e *echoState) reply(from, to int64, ts time.Time, samples []Sample) bool {
	if to <= e.contig || from > e.contig+maxJump {
		return false // a duplicate, or nothing to do with this stream
	}
	e.pending = append(e.pending, [2]int64{from, to})
	return e.advance(e.contig, ts, samples)
}

// acked takes the client's cumulative acknowledgement of the reply stream
// (an offset): the client's TCP holds every byte before it, whether or
// not the capture saw them arrive (tcpdump drops packets on a busy host).
func (e *echoState) acked(ack int64, ts time.Time, samples []Sample) bool {
	if ack <= e.contig || ack > e.contig+maxJump {
		return false
	}
	return e.advance(ack, ts, samples)
}

// advance moves what arrived in order to at least to, then through the
// pending segments it reaches, and answers the requests it completes.
func (e *echoState) advance(to int64, ts time.Time, samples []Sample) bool {
	before := e.contig
	e.contig = max(e.contig, to)
	for grew := true; grew; {
		grew = false
		kept := e.pending[:0]
		for _, r := range e.pending {
			switch {
			case r[1] <= e.contig: // delivered
			case r[0] <= e.contig:
				e.contig, grew = r[1], true
			default:
				kept = append(kept, r)
			}
		}
		e.pending = kept
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
	c := &Capture{Conns: map[ConnKey]*ConnStats{}}
	dirs := map[[3]uint32]*dirState{}
	lastTx := map[segKey]time.Time{}
	streams := map[ConnKey]*echoState{}
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
		key := ConnKey{cport, sport}
		cs := c.Conns[key]
		if cs == nil {
			a, _ := netip.AddrFromSlice(server.To4())
			cs = &ConnStats{ServerPort: sport, ClientPort: cport, Server: a}
			c.Conns[key] = cs
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
		dk := [3]uint32{uint32(cport), uint32(sport), map[bool]uint32{true: 1, false: 0}[toSrv]}
		ds := dirs[dk]
		if ds == nil {
			ds = &dirState{}
			dirs[dk] = ds
		}
		if seqLen > 0 {
			k := segKey{port: cport, sport: sport, toSrv: toSrv, seq: tcp.Seq, isSync: tcp.SYN}
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
		es := streams[key]
		if es == nil {
			es = &echoState{}
			streams[key] = es
		}
		if tcp.SYN {
			if toSrv {
				if es.reqKnown && es.reqBase != tcp.Seq+1 { // a new connection on a reused port
					es = &echoState{}
					streams[key] = es
				}
				es.reqBase, es.reqKnown = tcp.Seq+1, true
			} else {
				es.repBase, es.repKnown = tcp.Seq+1, true
			}
			continue
		}
		if toSrv && tcp.ACK && es.repKnown && es.acked(int64(int32(tcp.Ack-es.repBase)), ts, c.Samples) {
			cs.Progress = append(cs.Progress, ts)
		}
		if plen <= 0 || (toSrv && !es.reqKnown) || (!toSrv && !es.repKnown) {
			continue
		}
		if toSrv && sport != echoPort {
			continue
		}
		if toSrv {
			off := int64(int32(tcp.Seq - es.reqBase))
			if off < 0 || off > int64(len(es.sent))*8+maxJump {
				continue
			}
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
		from := int64(int32(tcp.Seq - es.repBase))
		if es.reply(from, from+int64(plen), ts, c.Samples) {
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

// Deliveries lists the connections to port (by first delivery): the
// server, the first and last delivery of new bytes in order and of any
// payload (duplicates included) since the capture began, and the longest
// gap between deliveries of new bytes.
func (c *Capture) Deliveries(port uint16) string {
	var conns []*ConnStats
	for k, cs := range c.Conns {
		if k.Server == port && len(cs.Progress) > 0 {
			conns = append(conns, cs)
		}
	}
	sort.Slice(conns, func(i, j int) bool { return conns[i].Progress[0].Before(conns[j].Progress[0]) })
	rel := func(t time.Time) string { return t.Sub(c.First).Round(time.Millisecond).String() }
	s := fmt.Sprintf("connections to port %d: first and last new bytes, last payload (duplicates included), longest gap between new bytes\n", port)
	for _, cs := range conns {
		var longest time.Duration
		for i := 1; i < len(cs.Progress); i++ {
			longest = max(longest, cs.Progress[i].Sub(cs.Progress[i-1]))
		}
		s += fmt.Sprintf("  %d -> %s: new bytes %s..%s, last payload %s, longest gap %s\n", cs.ClientPort, cs.Server,
			rel(cs.Progress[0]), rel(cs.Progress[len(cs.Progress)-1]), rel(cs.Arrivals[len(cs.Arrivals)-1]), longest.Round(time.Millisecond))
	}
	return s
}
