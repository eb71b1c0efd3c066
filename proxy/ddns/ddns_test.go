package ddns

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
)

func TestMain(m *testing.M) {
	lab.RunChild()
	os.Exit(m.Run())
}

var (
	oldIP = netip.MustParseAddr("10.1.0.10")
	newIP = netip.MustParseAddr("10.2.0.10")
	v6    = netip.MustParseAddr("2001:db8::10")
)

// sectionStrings renders a message section as zone-text lines (miekg/dns
// prints class ANY, 255, as CLASS255).
func sectionStrings(rrs []dns.RR) []string {
	var out []string
	for _, rr := range rrs {
		out = append(out, strings.Join(strings.Fields(rr.String()), " "))
	}
	return out
}

func TestBuildReplace(t *testing.T) {
	tests := []struct {
		name        string
		from, to    []Record
		prereq, upd []string
	}{{
		name:   "flip A",
		from:   []Record{{oldIP, 300}},
		to:     []Record{{newIP, 5}},
		prereq: []string{"svc.example. 0 IN A 10.1.0.10"},
		upd:    []string{"svc.example. 0 CLASS255 A", "svc.example. 5 IN A 10.2.0.10"},
	}, {
		name:   "add AAAA: its absence is a prerequisite",
		from:   []Record{{oldIP, 300}},
		to:     []Record{{oldIP, 300}, {v6, 300}},
		prereq: []string{"svc.example. 0 IN A 10.1.0.10", "svc.example. 0 NONE AAAA"},
		upd:    []string{"svc.example. 0 CLASS255 A", "svc.example. 0 CLASS255 AAAA", "svc.example. 300 IN A 10.1.0.10", "svc.example. 300 IN AAAA 2001:db8::10"},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := BuildReplace("example", "svc.example", tt.from, tt.to)
			if m.Opcode != dns.OpcodeUpdate || len(m.Question) != 1 || m.Question[0].Name != "example." || m.Question[0].Qtype != dns.TypeSOA {
				t.Fatalf("zone section = %v opcode %d", m.Question, m.Opcode)
			}
			if got := sectionStrings(m.Answer); strings.Join(got, "|") != strings.Join(tt.prereq, "|") {
				t.Errorf("prerequisites\n got %q\nwant %q", got, tt.prereq)
			}
			if got := sectionStrings(m.Ns); strings.Join(got, "|") != strings.Join(tt.upd, "|") {
				t.Errorf("updates\n got %q\nwant %q", got, tt.upd)
			}
			if _, err := m.Pack(); err != nil {
				t.Errorf("pack: %v", err)
			}
		})
	}
}

func TestSerialAtLeast(t *testing.T) {
	for _, c := range []struct {
		got, want uint32
		ok        bool
	}{{5, 5, true}, {6, 5, true}, {4, 5, false}, {1, 0xfffffff0, true}, {0xfffffff0, 1, false}} {
		if serialAtLeast(c.got, c.want) != c.ok {
			t.Errorf("serialAtLeast(%d, %d) != %v", c.got, c.want, c.ok)
		}
	}
}

// TestAgainstServers runs the whole flip cycle against real BIND9 and Knot.
func TestAgainstServers(t *testing.T) {
	l := labtest.New(t, lab.Config{Links: map[string]lab.Profile{}})
	labtest.RequireTools(t, "knotd")
	ctx := context.Background()
	knot, err := l.StartKnot(ctx)
	if err != nil {
		t.Fatalf("start knot: %v", err)
	}
	key, err := LoadKey(l.KeyFile())
	if err != nil {
		t.Fatal(err)
	}
	for _, srv := range []struct {
		name    string
		server  string
		servers []string
	}{
		{"bind9", lab.DNSIP.String() + ":53", nil}, // servers from the NS set
		{"knot", knot.String(), []string{knot.String()}},
	} {
		t.Run(srv.name, func(t *testing.T) {
			c := &Client{Server: srv.server, Key: key, Servers: srv.servers, Timeout: 2 * time.Second,
				VerifyTimeout: 10 * time.Second, Dial: l.Dialer(lab.Client)}
			runCycle(t, c)
		})
	}
}

func runCycle(t *testing.T, c *Client) {
	ctx := context.Background()
	zone, name := lab.Zone, lab.SvcName
	start, err := c.Show(ctx, zone, name)
	if err != nil {
		t.Fatal(err)
	}
	if !sameRecords(start.Records, []Record{{oldIP, lab.SvcTTL}}) {
		t.Fatalf("initial records %v", start.Records)
	}

	prep, err := c.Prepare(ctx, zone, name, 5)
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	if prep.Wait != Seconds(lab.SvcTTL*time.Second) || !sameRecords(prep.After.Records, []Record{{oldIP, 5}}) || !prep.Changed {
		t.Fatalf("prepare: %+v", prep)
	}
	// The TTL is now low: a second prepare changes nothing but still proves
	// the key with a signed prerequisite-only UPDATE, so a wrong secret is
	// found here, before a migration's commit point.
	again, err := c.Prepare(ctx, zone, name, 5)
	if err != nil || again.Changed || !again.KeyProved || again.Wait != Seconds(5*time.Second) ||
		!serialAtLeast(again.Before.Serial, again.After.Serial) || again.After.Serial != prep.After.Serial {
		t.Fatalf("prepare at a low TTL: %+v, %v", again, err)
	}
	wrong := *c
	wrong.Key.Secret = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	if _, err := wrong.Prepare(ctx, zone, name, 5); err == nil || !strings.Contains(err.Error(), "BADSIG") {
		t.Fatalf("prepare at a low TTL with a wrong secret: err = %v, want BADSIG in words", err)
	}

	// A wrong secret and a wrong key name are refused in words; nothing changes.
	bad := *c
	bad.Key.Secret = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	_, err = bad.Flip(ctx, zone, name, []netip.Addr{oldIP}, []netip.Addr{newIP}, 5)
	var ue *UpdateError
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "BADSIG") {
		t.Fatalf("wrong secret: err = %v, want BADSIG in words", err)
	}
	bad = *c
	bad.Key.Name = "nobody."
	_, err = bad.Flip(ctx, zone, name, []netip.Addr{oldIP}, []netip.Addr{newIP}, 5)
	if !errors.As(err, &ue) || !strings.Contains(err.Error(), "BADKEY") {
		t.Fatalf("wrong key name: err = %v, want BADKEY in words", err)
	}
	assertRecords(t, c, []Record{{oldIP, 5}})

	// A stale view (someone changed the record since we read it) fails the
	// prerequisite on the server and overwrites nothing.
	err = c.replace(ctx, zone, name, []Record{{netip.MustParseAddr("10.1.0.99"), 5}}, []Record{{newIP, 5}})
	if !errors.Is(err, ErrPrerequisite) {
		t.Fatalf("stale prerequisite: err = %v", err)
	}
	assertRecords(t, c, []Record{{oldIP, 5}})
	// Flip refuses when the record is not the expected old address.
	if _, err := c.Flip(ctx, zone, name, []netip.Addr{netip.MustParseAddr("10.1.0.99")}, []netip.Addr{newIP}, 5); !errors.Is(err, ErrPrerequisite) {
		t.Fatalf("flip from wrong old: err = %v", err)
	}

	// The new address given twice (`--new a,a`) is written and verified once.
	flip, err := c.Flip(ctx, zone, name, []netip.Addr{oldIP}, []netip.Addr{newIP, newIP}, 5)
	if err != nil {
		t.Fatalf("flip: %v", err)
	}
	if !flip.Changed || !serialAtLeast(flip.After.Serial, flip.Before.Serial+1) {
		t.Fatalf("flip: %+v", flip)
	}
	assertRecords(t, c, []Record{{newIP, 5}})
	// Idempotent: flipping again changes nothing.
	if again, err := c.Flip(ctx, zone, name, []netip.Addr{oldIP}, []netip.Addr{newIP}, 5); err != nil || again.Changed {
		t.Fatalf("second flip: %+v, %v", again, err)
	}

	// 90 addresses: an UPDATE of ~5 kB, sent over TCP; and back.
	var many []netip.Addr
	for i := 1; i <= 90; i++ {
		many = append(many, netip.AddrFrom4([4]byte{10, 2, 1, byte(i)}))
	}
	if res, err := c.Flip(ctx, zone, name, []netip.Addr{newIP}, many, 5); err != nil || len(res.After.Records) != 90 {
		t.Fatalf("flip to 90 addresses: %d records, %v", len(res.After.Records), err)
	}
	if _, err := c.Flip(ctx, zone, name, many, []netip.Addr{newIP}, 5); err != nil {
		t.Fatalf("flip back from 90 addresses: %v", err)
	}
	assertRecords(t, c, []Record{{newIP, 5}})

	rb, err := c.Rollback(ctx, zone, name, flip.Before.Records, []netip.Addr{newIP})
	if err != nil {
		t.Fatalf("rollback: %v", err)
	}
	if !sameRecords(rb.After.Records, flip.Before.Records) {
		t.Fatalf("rollback restored %v, want exactly %v", rb.After.Records, flip.Before.Records)
	}

	if _, err := c.Restore(ctx, zone, name, lab.SvcTTL); err != nil {
		t.Fatalf("restore: %v", err)
	}
	assertRecords(t, c, start.Records)
}

func assertRecords(t *testing.T, c *Client, want []Record) {
	t.Helper()
	s, err := c.Show(context.Background(), lab.Zone, lab.SvcName)
	if err != nil {
		t.Fatal(err)
	}
	if !sameRecords(s.Records, want) {
		t.Fatalf("records = %v, want %v", s.Records, want)
	}
}
