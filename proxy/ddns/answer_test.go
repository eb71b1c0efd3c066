package ddns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

const (
	testKeyName = "vmhop-test."
	testSecret  = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="
	otherSecret = "b3RoZXJvdGhlcm90aGVyb3RoZXJvdGhlcm90aGVyMTI="
)

// fakeUpdate is an UPDATE as the fake primary received it.
type fakeUpdate struct {
	network string // "udp" or "tcp"
	size    int    // bytes on the wire, TSIG included
	msg     *dns.Msg
}

// fakePrimary is a small authoritative server for example. whose answers
// to UPDATEs are as bad as a test wants: unsigned, or signed with a secret
// other than the client's. It holds svc.example.'s A RRset (at first
// 10.1.0.10, TTL 300) and applies the deletes and adds of every UPDATE
// without checking prerequisites, keeping one record per address as real
// servers do; SOA serial 7. Queries are answered unsigned, as real servers
// answer unsigned queries.
type fakePrimary struct {
	Addr string
	mu   sync.Mutex
	seen []fakeUpdate
	a    []dns.RR
}

// startFakePrimary serves on 127.0.0.1 (UDP and TCP, one port). sign is how
// it signs its UPDATE answers: "" not at all, else with this secret.
func startFakePrimary(t *testing.T, sign string) *fakePrimary {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	first, _ := dns.NewRR("svc.example. 300 IN A 10.1.0.10")
	f := &fakePrimary{Addr: pc.LocalAddr().String(), a: []dns.RR{first}}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		r := new(dns.Msg)
		r.SetReply(q)
		r.Authoritative = true
		if q.Opcode == dns.OpcodeUpdate {
			b, _ := q.Pack()
			network := "tcp"
			if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
				network = "udp"
			}
			f.mu.Lock()
			f.seen = append(f.seen, fakeUpdate{network, len(b), q})
			f.apply(q.Ns)
			f.mu.Unlock()
			if t := q.IsTsig(); t != nil && sign != "" {
				r.SetTsig(t.Hdr.Name, t.Algorithm, 300, time.Now().Unix())
			}
			w.WriteMsg(r)
			return
		}
		switch q.Question[0].Qtype {
		case dns.TypeA:
			f.mu.Lock()
			r.Answer = append(r.Answer, f.a...)
			f.mu.Unlock()
		case dns.TypeSOA:
			rr, _ := dns.NewRR("example. 300 IN SOA ns.example. h.example. 7 1 1 1 1")
			r.Answer = append(r.Answer, rr)
		}
		w.WriteMsg(r)
	})
	secrets := map[string]string{testKeyName: sign}
	// miekg/dns refuses UPDATEs (NOTIMP) unless told to take every message.
	accept := func(dns.Header) dns.MsgAcceptAction { return dns.MsgAccept }
	udp := &dns.Server{PacketConn: pc, Handler: handler, TsigSecret: secrets, MsgAcceptFunc: accept}
	tcp := &dns.Server{Listener: ln, Handler: handler, TsigSecret: secrets, MsgAcceptFunc: accept}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	t.Cleanup(func() { udp.Shutdown(); tcp.Shutdown() })
	return f
}

// apply runs an UPDATE's update section on the A RRset (f.mu held).
func (f *fakePrimary) apply(ns []dns.RR) {
	for _, rr := range ns {
		a, ok := rr.(*dns.A)
		switch {
		case rr.Header().Class == dns.ClassANY && rr.Header().Rrtype == dns.TypeA:
			f.a = nil
		case ok && rr.Header().Class == dns.ClassINET:
			dup := false
			for _, have := range f.a {
				dup = dup || have.(*dns.A).A.Equal(a.A)
			}
			if !dup {
				f.a = append(f.a, dns.Copy(a))
			}
		}
	}
}

func (f *fakePrimary) updates() []fakeUpdate {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakeUpdate(nil), f.seen...)
}

func testClient(server string) *Client {
	return &Client{Server: server, Key: Key{testKeyName, dns.HmacSHA256, testSecret}, Timeout: time.Second}
}

// TestAnswerMustBeSigned: RFC 8945 §5.3. A NOERROR that is unsigned, or
// signed with another secret, is not a success; the error says which.
func TestAnswerMustBeSigned(t *testing.T) {
	for _, tt := range []struct {
		name, sign, want string
	}{
		{"unsigned NOERROR", "", "the NOERROR answer carries no TSIG"},
		{"NOERROR signed with another secret", otherSecret, "the NOERROR answer's TSIG (key \"vmhop-test.\") does not verify with our secret"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := startFakePrimary(t, tt.sign)
			_, err := testClient(f.Addr).Flip(context.Background(), "example.", "svc.example.", []netip.Addr{oldIP}, []netip.Addr{newIP}, 5)
			if !errors.Is(err, ErrAnswerSignature) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v\nwant ErrAnswerSignature with %q", err, tt.want)
			}
			if n := len(f.updates()); n != 1 {
				t.Fatalf("%d UPDATEs sent, want 1", n)
			}
		})
	}
	// The same fake signing with the client's secret is believed: the check
	// refuses bad signatures, not signatures.
	f := startFakePrimary(t, testSecret)
	if err := testClient(f.Addr).replace(context.Background(), "example.", "svc.example.", []Record{{oldIP, 300}}, []Record{{newIP, 5}}); err != nil {
		t.Fatalf("well-signed answer: %v", err)
	}
}

// TestLargeUpdateGoesOverTCP: an UPDATE over 512 bytes once signed goes
// over TCP, as nsupdate sends it; a small one over UDP.
func TestLargeUpdateGoesOverTCP(t *testing.T) {
	f := startFakePrimary(t, testSecret)
	c := testClient(f.Addr)
	many := make([]Record, 90)
	for i := range many {
		many[i] = Record{netip.AddrFrom4([4]byte{10, 2, 0, byte(i + 1)}), 5}
	}
	ctx := context.Background()
	if err := c.replace(ctx, "example.", "svc.example.", []Record{{oldIP, 300}}, []Record{{newIP, 5}}); err != nil {
		t.Fatal(err)
	}
	if err := c.replace(ctx, "example.", "svc.example.", []Record{{oldIP, 300}}, many); err != nil {
		t.Fatal(err)
	}
	u := f.updates()
	if len(u) != 2 {
		t.Fatalf("%d UPDATEs, want 2", len(u))
	}
	if u[0].network != "udp" || u[0].size > dns.MinMsgSize {
		t.Errorf("small UPDATE: %d bytes over %s, want at most 512 over udp", u[0].size, u[0].network)
	}
	if u[1].network != "tcp" || u[1].size <= dns.MinMsgSize || len(u[1].msg.Ns) != 91 {
		t.Errorf("90-address UPDATE: %d bytes, %d updates over %s, want over 512 bytes and 91 updates over tcp",
			u[1].size, len(u[1].msg.Ns), u[1].network)
	}
}

// TestFlipDeduplicates: `--new a,a` writes and verifies one record for a;
// the server keeps one anyway, so asking for two could never verify.
func TestFlipDeduplicates(t *testing.T) {
	f := startFakePrimary(t, testSecret)
	c := testClient(f.Addr)
	c.Servers = []string{f.Addr}
	res, err := c.Flip(context.Background(), "example.", "svc.example.", []netip.Addr{oldIP, oldIP}, []netip.Addr{newIP, newIP}, 5)
	if err != nil {
		t.Fatalf("flip: %v", err)
	}
	if !res.Changed || !sameRecords(res.After.Records, []Record{{newIP, 5}}) {
		t.Fatalf("flip: %+v", res)
	}
	u := f.updates()
	if len(u) != 1 || len(u[0].msg.Ns) != 2 {
		t.Fatalf("UPDATEs %v, want one: delete the A RRset, add %s once", u, newIP)
	}
}

// TestProveKey: the proof is one signed UPDATE with the name's records as
// prerequisites and nothing to change; a primary that answers with
// another key's signature fails it.
func TestProveKey(t *testing.T) {
	f := startFakePrimary(t, testSecret)
	if err := testClient(f.Addr).ProveKey(context.Background(), "example.", "svc.example."); err != nil {
		t.Fatal(err)
	}
	u := f.updates()
	if len(u) != 1 || len(u[0].msg.Ns) != 0 || len(u[0].msg.Answer) != 1 || u[0].msg.IsTsig() == nil {
		t.Fatalf("UPDATEs: %+v, want one signed, prerequisites only", u)
	}
	f.mu.Lock()
	a := f.a
	f.mu.Unlock()
	if len(a) != 1 || a[0].Header().Ttl != 300 {
		t.Fatalf("records changed: %v", a)
	}
	bad := startFakePrimary(t, otherSecret)
	if err := testClient(bad.Addr).ProveKey(context.Background(), "example.", "svc.example."); err == nil {
		t.Fatal("a primary signing with another key proved the key")
	}
}
