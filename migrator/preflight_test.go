package migrator

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/proxy/ddns"
)

// authServer is a primary for example. holding svc.example.'s A and AAAA
// RRsets (at first rrs, zone text), on 127.0.0.1 over UDP. It takes
// UPDATEs signed with testKey, applies their deletes (by type) and adds
// (prerequisites unchecked) and signs its answers to them.
func authServer(t *testing.T, rrs ...string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var rrset []dns.RR
	for _, s := range rrs {
		rr, err := dns.NewRR(s)
		if err != nil {
			t.Fatal(err)
		}
		rrset = append(rrset, rr)
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		mu.Lock()
		defer mu.Unlock()
		r := new(dns.Msg)
		r.SetReply(q)
		if q.Opcode == dns.OpcodeUpdate {
			for _, u := range q.Ns {
				switch {
				case u.Header().Class == dns.ClassANY:
					rrset = slices.DeleteFunc(rrset, func(rr dns.RR) bool { return rr.Header().Rrtype == u.Header().Rrtype })
				case u.Header().Rrtype == dns.TypeA || u.Header().Rrtype == dns.TypeAAAA:
					rrset = append(rrset, dns.Copy(u))
				}
			}
			if tsig := q.IsTsig(); tsig != nil {
				r.SetTsig(tsig.Hdr.Name, tsig.Algorithm, 300, time.Now().Unix())
			}
			w.WriteMsg(r)
			return
		}
		switch qt := q.Question[0].Qtype; qt {
		case dns.TypeA, dns.TypeAAAA:
			for _, rr := range rrset {
				if rr.Header().Rrtype == qt {
					r.Answer = append(r.Answer, rr)
				}
			}
		case dns.TypeSOA:
			soa, _ := dns.NewRR("example. 300 IN SOA ns.example. h.example. 7 1 1 1 1")
			r.Answer = append(r.Answer, soa)
		}
		w.WriteMsg(r)
	})
	srv := &dns.Server{PacketConn: pc, Handler: handler, TsigSecret: map[string]string{testKey.Name: testKey.Secret},
		MsgAcceptFunc: func(dns.Header) dns.MsgAcceptAction { return dns.MsgAccept }}
	go srv.ActivateAndServe()
	t.Cleanup(func() { srv.Shutdown() })
	return pc.LocalAddr().String()
}

var testKey = ddns.Key{Name: "vmhop-test.", Algorithm: dns.HmacSHA256, Secret: "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="}

func dnsClient(server string) *ddns.Client {
	return &ddns.Client{Server: server, Servers: []string{server}, Key: testKey, Timeout: time.Second}
}

// TestCheck: addresses a host holds itself are refused for the VM, a host
// must hold its WAN address, and the DNS name must hold old_ip; the DNS
// wait is the record's whole TTL. The hosts are this process's namespace,
// which holds 127.0.0.1.
func TestCheck(t *testing.T) {
	lo := netip.MustParseAddr("127.0.0.1")
	plan := func(edit func(p *Plan)) *Plan {
		p := &Plan{
			Source: &Host{Name: "host A", Address: lo}, Dest: &Host{Name: "host B", Address: lo}, SourceWAN: lo, DestWAN: lo,
			OldIP: netip.MustParseAddr("192.0.2.10"), NewIP: netip.MustParseAddr("198.51.100.10"), Gateway: netip.MustParseAddr("192.0.2.1"),
			Zone: "example.", DNSName: "svc.example.", TTL: 5,
		}
		if edit != nil {
			edit(p)
		}
		return p
	}
	ctx := context.Background()
	for _, tt := range []struct {
		name string
		edit func(p *Plan)
		want string
	}{
		{"new ip is the host's", func(p *Plan) { p.NewIP = lo }, "new_ip 127.0.0.1 is an address of host A itself"},
		{"gateway is the host's", func(p *Plan) { p.Gateway = lo }, "gateway 127.0.0.1 is an address of host A itself"},
		{"wan address not held", func(p *Plan) { p.DestWAN = netip.MustParseAddr("203.0.113.1") }, "host B does not hold its WAN address 203.0.113.1"},
		{"dns holds something else", func(p *Plan) {
			p.DNS = dnsClient(authServer(t, "svc.example. 60 IN A 192.0.2.99"))
		}, "svc.example. holds [192.0.2.99], not the VM's old addresses [192.0.2.10] (A and AAAA): the flip after the move would fail"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Check(ctx, plan(tt.edit)); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	// A one-hour TTL is waited out in full, and said so before the move.
	p := plan(func(p *Plan) {
		p.DNS = dnsClient(authServer(t, "svc.example. 3600 IN A 192.0.2.10"))
	})
	pf, err := Check(ctx, p)
	if err != nil || pf.DNSWait != time.Hour || pf.DNSCachedFor != 5*time.Second {
		t.Fatalf("Check = %+v, %v; want a 1h wait, 5s cached after the flip", pf, err)
	}
}

// TestDrainHoldsUntilCachesExpire: the redirect stays while resolvers may
// hold the old address (set by the flip), even when idle and past
// drain_timeout; without DNS, idle or the timeout end it.
func TestDrainHoldsUntilCachesExpire(t *testing.T) {
	now := time.Now()
	p := &Plan{DrainIdle: 5 * time.Second, DrainTimeout: time.Minute}
	for _, tt := range []struct {
		name    string
		cached  time.Time
		elapsed time.Duration
		idle    time.Duration
		seen    bool
		drained bool
	}{
		{"busy", time.Time{}, 10 * time.Second, time.Second, true, false},
		{"idle", time.Time{}, 10 * time.Second, 6 * time.Second, true, true},
		{"nothing seen", time.Time{}, 6 * time.Second, 0, false, true},
		{"busy past the timeout", time.Time{}, 2 * time.Minute, 0, true, true},
		{"idle, caches hold the old address", now.Add(time.Hour), 10 * time.Second, 6 * time.Second, true, false},
		{"past the timeout, caches hold it", now.Add(time.Hour), 2 * time.Minute, 0, true, false},
		{"idle, caches expired", now.Add(-time.Second), 10 * time.Second, 6 * time.Second, true, true},
	} {
		p.dnsCachedUntil = tt.cached
		if got := p.drained(tt.elapsed, tt.idle, tt.seen, now); got != tt.drained {
			t.Errorf("%s: drained = %v, want %v", tt.name, got, tt.drained)
		}
	}
}

// TestDNSTTLSteps: dns-prepare waits the old TTL in full (2 s here; it was
// capped), the flip says how long resolvers may hold the old address, and
// after the move the TTL is raised back to the original.
func TestDNSTTLSteps(t *testing.T) {
	ctx := context.Background()
	p := &Plan{
		DNS: dnsClient(authServer(t, "svc.example. 2 IN A 192.0.2.10")), Zone: "example.", DNSName: "svc.example.", TTL: 1,
		OldIP: netip.MustParseAddr("192.0.2.10"), NewIP: netip.MustParseAddr("198.51.100.10"), Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	r := &run{p: p}
	t0 := time.Now()
	if err := r.dnsPrepare(ctx); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took < 2*time.Second || r.rep.DNSWait != 2*time.Second {
		t.Fatalf("prepare waited %s (reported %s), want the old TTL, 2s", took, r.rep.DNSWait)
	}
	if err := r.dnsFlip(ctx); err != nil {
		t.Fatal(err)
	}
	if r.rep.DNSCachedFor != time.Second || time.Until(p.dnsCachedUntil) > time.Second {
		t.Fatalf("after the flip, caches hold the old address %s (until %s), want the low TTL, 1s", r.rep.DNSCachedFor, p.dnsCachedUntil)
	}
	if err := r.dnsRestore(ctx); err != nil {
		t.Fatal(err)
	}
	want := []ddns.Record{{Addr: p.NewIP, TTL: 2}}
	if !slices.Equal(r.rep.DNSAfter, want) {
		t.Fatalf("after the move: %v, want %v (the original TTL)", r.rep.DNSAfter, want)
	}
}

// TestDNSDualStack: a dual-stack plan needs the name to hold both old
// addresses (A and AAAA) before the move, and its flip replaces both in one
// change; prepare and restore carry both records' TTLs.
func TestDNSDualStack(t *testing.T) {
	ctx := context.Background()
	lo := netip.MustParseAddr("127.0.0.1")
	old4, new4 := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.51.100.10")
	old6, new6 := netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:2::10")
	plan := func(server string) *Plan {
		return &Plan{
			Source: &Host{Name: "host A", Address: lo}, Dest: &Host{Name: "host B", Address: lo}, SourceWAN: lo, DestWAN: lo,
			OldIP: old4, NewIP: new4, Gateway: netip.MustParseAddr("192.0.2.1"),
			OldIP6: old6, NewIP6: new6, Gateway6: netip.MustParseAddr("fe80::1"),
			DNS: dnsClient(server), Zone: "example.", DNSName: "svc.example.", TTL: 1,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
	}
	// Only the A record: the flip to [new4, new6] would find no old AAAA.
	if _, err := Check(ctx, plan(authServer(t, "svc.example. 2 IN A 192.0.2.10"))); err == nil ||
		!strings.Contains(err.Error(), "holds [192.0.2.10], not the VM's old addresses [192.0.2.10 2001:db8:1::10]") {
		t.Fatalf("Check with no AAAA: %v", err)
	}
	p := plan(authServer(t, "svc.example. 2 IN A 192.0.2.10", "svc.example. 2 IN AAAA 2001:db8:1::10"))
	if pf, err := Check(ctx, p); err != nil || pf.DNSWait != 2*time.Second {
		t.Fatalf("Check = %+v, %v", pf, err)
	}
	r := &run{p: p}
	if err := r.dnsPrepare(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.dnsFlip(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.dnsRestore(ctx); err != nil {
		t.Fatal(err)
	}
	want := []ddns.Record{{Addr: new4, TTL: 2}, {Addr: new6, TTL: 2}}
	got := slices.Clone(r.rep.DNSAfter)
	slices.SortFunc(got, func(a, b ddns.Record) int { return a.Addr.Compare(b.Addr) })
	if !slices.Equal(got, want) {
		t.Fatalf("after the move: %v, want %v (A and AAAA flipped, the original TTL back)", got, want)
	}
	st, err := p.DNS.Show(ctx, p.Zone, p.DNSName)
	if err != nil || !slices.Equal(st.Addrs(), []netip.Addr{new4, new6}) {
		t.Fatalf("the server serves %v, %v", st.Addrs(), err)
	}
}
