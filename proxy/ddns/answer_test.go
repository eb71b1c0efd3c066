package ddns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
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
// other than the client's. It holds svc.example.'s A and AAAA RRsets (at
// first A 10.1.0.10, TTL 300; more with extra) and applies the deletes and adds of every UPDATE
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
func startFakePrimary(t *testing.T, sign string, extra ...string) *fakePrimary {
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
	for _, x := range extra {
		rr, err := dns.NewRR(x)
		if err != nil {
			t.Fatal(err)
		}
		f.a = append(f.a, rr)
	}
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
		case dns.TypeA, dns.TypeAAAA:
			f.mu.Lock()
			for _, rr := range f.a {
				if rr.Header().Rrtype == q.Question[0].Qtype {
					r.Answer = append(r.Answer, rr)
				}
			}
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

// apply runs an UPDATE's update section on the A and AAAA RRsets (f.mu
// held): deletes by type, adds without duplicates.
func (f *fakePrimary) apply(ns []dns.RR) {
	for _, rr := range ns {
		h := rr.Header()
		if h.Rrtype != dns.TypeA && h.Rrtype != dns.TypeAAAA {
			continue
		}
		switch h.Class {
		case dns.ClassANY:
			f.a = slices.DeleteFunc(f.a, func(have dns.RR) bool { return have.Header().Rrtype == h.Rrtype })
		case dns.ClassINET:
			dup := false
			for _, have := range f.a {
				dup = dup || dns.IsDuplicate(have, rr)
			}
			if !dup {
				f.a = append(f.a, dns.Copy(rr))
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

// TestDualStackCycle: a name with A and AAAA records (a dual-stack VM)
// goes through prepare, flip, rollback, flip and restore; each change is
// one UPDATE that pins and replaces both RRsets, and each step leaves
// exactly the records asked for. A name's AAAA alone (the IPv6 side) flips
// without touching A.
func TestDualStackCycle(t *testing.T) {
	ctx := context.Background()
	old6, new6 := netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:2::10")
	f := startFakePrimary(t, testSecret, "svc.example. 300 IN AAAA 2001:db8:1::10")
	c := testClient(f.Addr)
	c.Servers = []string{f.Addr}
	zone, name := "example.", "svc.example."
	show := func(want ...Record) {
		t.Helper()
		s, err := c.Show(ctx, zone, name)
		if err != nil || !sameRecords(s.Records, want) {
			t.Fatalf("records = %v, %v; want %v", s.Records, err, want)
		}
	}
	prep, err := c.Prepare(ctx, zone, name, 5)
	if err != nil || !prep.Changed || prep.Wait != Seconds(300*time.Second) {
		t.Fatalf("prepare: %+v, %v", prep, err)
	}
	show(Record{oldIP, 5}, Record{old6, 5})
	flip, err := c.Flip(ctx, zone, name, []netip.Addr{old6, oldIP}, []netip.Addr{newIP, new6}, 5)
	if err != nil || !flip.Changed {
		t.Fatalf("flip: %+v, %v", flip, err)
	}
	show(Record{newIP, 5}, Record{new6, 5})
	u := f.updates()
	last := u[len(u)-1].msg
	if got, want := sectionStrings(last.Answer), []string{"svc.example. 0 IN A 10.1.0.10", "svc.example. 0 IN AAAA 2001:db8:1::10"}; strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("flip prerequisites %q, want %q", got, want)
	}
	if got, want := sectionStrings(last.Ns), []string{"svc.example. 0 CLASS255 A", "svc.example. 0 CLASS255 AAAA",
		"svc.example. 5 IN A 10.2.0.10", "svc.example. 5 IN AAAA 2001:db8:2::10"}; strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("flip updates %q, want %q", got, want)
	}
	// Flipping from the wrong old set (the AAAA forgotten) is refused.
	if _, err := c.Flip(ctx, zone, name, []netip.Addr{newIP}, []netip.Addr{oldIP}, 5); !errors.Is(err, ErrPrerequisite) {
		t.Fatalf("flip from [new4] only: %v, want ErrPrerequisite", err)
	}
	if _, err := c.Rollback(ctx, zone, name, flip.Before.Records, []netip.Addr{newIP, new6}); err != nil {
		t.Fatalf("rollback: %v", err)
	}
	show(Record{oldIP, 5}, Record{old6, 5})
	if _, err := c.Flip(ctx, zone, name, []netip.Addr{oldIP, old6}, []netip.Addr{newIP, new6}, 5); err != nil {
		t.Fatalf("flip again: %v", err)
	}
	if _, err := c.Restore(ctx, zone, name, 300); err != nil {
		t.Fatalf("restore: %v", err)
	}
	show(Record{newIP, 300}, Record{new6, 300})

	// The AAAA alone: A is neither pinned nor touched.
	g := startFakePrimary(t, testSecret)
	g.mu.Lock()
	g.a = nil
	g.apply([]dns.RR{&dns.AAAA{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 60}, AAAA: old6.AsSlice()}})
	g.mu.Unlock()
	c = testClient(g.Addr)
	c.Servers = []string{g.Addr}
	if _, err := c.Flip(ctx, zone, name, []netip.Addr{old6}, []netip.Addr{new6}, 5); err != nil {
		t.Fatalf("flip AAAA: %v", err)
	}
	show(Record{new6, 5})
	u = g.updates()
	if got := sectionStrings(u[len(u)-1].msg.Ns); strings.Join(got, "|") != "svc.example. 0 CLASS255 AAAA|svc.example. 5 IN AAAA 2001:db8:2::10" {
		t.Errorf("AAAA flip updates %q", got)
	}
}
