package lab_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/proxy/ddns"
)

func TestMain(m *testing.M) {
	lab.RunChild()
	os.Exit(m.Run())
}

// TestWAN checks the emulated WAN delivers what it is configured for:
// RTT from 5% under to 15% over the configured delay (the emulator never
// delivers early; forwarding in userspace on a busy 2-core machine adds
// up to a few milliseconds over four hops: one CI run measured 33.3 ms for
// 30) and TCP goodput within 10% of the rate.
func TestWAN(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	links := lab.DefaultLinks()
	for _, c := range []struct{ from, to string }{{lab.SiteA, lab.SiteB}, {lab.Client, lab.SiteA}, {lab.Client, lab.SiteB}} {
		want := 2 * (links[c.from].Delay + links[c.to].Delay)
		got, err := l.MeasureRTT(ctx, c.from, c.to, 20)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("rtt %s->%s: %v (configured %v)", c.from, c.to, got, want)
		if float64(got) < 0.95*float64(want) || float64(got) > 1.15*float64(want) {
			t.Errorf("rtt %s->%s = %v, want %v -5%%/+15%%", c.from, c.to, got, want)
		}
	}
	rate := float64(links[lab.SiteA].Rate)
	for _, c := range []struct{ from, to string }{{lab.SiteA, lab.SiteB}, {lab.SiteB, lab.SiteA}} {
		bps, err := l.MeasureThroughput(ctx, c.from, c.to, 6*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("tcp %s->%s: %.1f Mbit/s (rate %.0f Mbit/s)", c.from, c.to, bps/1e6, rate/1e6)
		if bps < 0.9*rate || bps > 1.1*rate {
			t.Errorf("tcp %s->%s = %.1f Mbit/s, want %.0f ±10%%", c.from, c.to, bps/1e6, rate/1e6)
		}
	}
}

func TestBIND(t *testing.T) {
	l := labtest.New(t, lab.Config{Links: map[string]lab.Profile{}})
	r, err := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != lab.OldIP.String() || !r.Authoritative {
		t.Fatalf("svc A = %v (aa=%v), want %s authoritative", r.Answer, r.Authoritative, lab.OldIP)
	}
	// The client's resolver is the lab's BIND.
	out, err := netns.Run(context.Background(), l.NS(lab.Client), "cat", "/etc/resolv.conf")
	if err != nil || !strings.Contains(out, lab.DNSIP.String()) {
		t.Fatalf("client resolv.conf = %q, %v", out, err)
	}

	// The key file the lab wrote is in BIND's format, as ddns reads it.
	key, err := ddns.LoadKey(l.KeyFile())
	if err != nil {
		t.Fatal(err)
	}
	if key.Algorithm != dns.HmacSHA256 {
		t.Fatalf("algorithm %s", key.Algorithm)
	}
	keyName, secret := key.Name, key.Secret
	update := func(ip string, sign bool) *dns.Msg {
		m := new(dns.Msg)
		m.SetUpdate(lab.Zone)
		rr, _ := dns.NewRR("svc.example. 60 IN A " + ip)
		m.RemoveRRset([]dns.RR{rr})
		m.Insert([]dns.RR{rr})
		c := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
		if sign {
			m.SetTsig(keyName, dns.HmacSHA256, 300, time.Now().Unix())
			c.TsigSecret = map[string]string{keyName: secret}
		}
		conn, err := l.Dialer(lab.Client)(context.Background(), "udp", lab.DNSIP.String()+":53")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		resp, _, err := c.ExchangeWithConn(m, &dns.Conn{Conn: conn, TsigSecret: c.TsigSecret})
		if err != nil {
			t.Fatalf("update (signed=%v): %v", sign, err)
		}
		return resp
	}
	if resp := update("10.9.9.9", false); resp.Rcode != dns.RcodeRefused {
		t.Fatalf("unsigned update: rcode %s, want REFUSED", dns.RcodeToString[resp.Rcode])
	}
	if r, _ := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA); r.Answer[0].(*dns.A).A.String() != lab.OldIP.String() {
		t.Fatalf("unsigned update changed the record: %v", r.Answer)
	}
	if resp := update(lab.NewIP.String(), true); resp.Rcode != dns.RcodeSuccess {
		t.Fatalf("signed update: rcode %s", dns.RcodeToString[resp.Rcode])
	}
	r, err = l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA)
	if err != nil || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != lab.NewIP.String() {
		t.Fatalf("after signed update: %v %v", r, err)
	}
}

func TestGuest(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	start := time.Now()
	vm, err := l.StartVM(ctx, lab.VMConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitGuest(ctx, vm.IP, 90*time.Second); err != nil {
		b, _ := os.ReadFile(vm.Machine.Console)
		t.Fatalf("guest not answering echo: %v\nconsole:\n%s", err, b)
	}
	t.Logf("guest answers echo %v after start", time.Since(start).Round(time.Millisecond))

	payload := bytes.Repeat([]byte("vmhop-echo-"), 2000)
	if err := l.Echo(ctx, lab.Client, vm.IP, payload); err != nil {
		t.Fatal(err)
	}
	resp, err := l.HTTPClient(lab.Client).Get("http://" + vm.IP.String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !regexp.MustCompile(`^vmhop-guest boot_id=[0-9a-f]{32} uptime=[0-9.]+ counter=\d+ requests=\d+ disk_acked=\d+\n$`).Match(body) {
		t.Fatalf("HTTP page = %q", body)
	}
	s1, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	s2, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	if s2.BootID != s1.BootID || s2.Counter <= s1.Counter || s2.DiskAcked <= s1.DiskAcked || s2.DiskErrors != 0 {
		t.Fatalf("guest not progressing: %+v then %+v", s1, s2)
	}
	// The guest's own verifier (reading the disk past its page cache) finds every acked record.
	resp, err = l.HTTPClient(lab.Client).Get("http://" + vm.IP.String() + "/verify?acked=" + itoa(s2.DiskAcked))
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Contains(body, []byte(`"Lost":0`)) {
		t.Fatalf("guest verify: %s", body)
	}
}

// TestUpAfterCrash: a lab whose builder died without Down is replaced by the next Up.
func TestUpAfterCrash(t *testing.T) {
	labtest.RequireRoot(t)
	ctx := context.Background()
	cfg := lab.Config{Name: "tcrash" + itoa(uint64(os.Getpid()%100)), Owner: os.Getpid(), Links: map[string]lab.Profile{}}
	l1, err := lab.Up(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { labtest.DownAndAssertGone(t, l1) })
	// No Down: as if the process had been killed here.
	l2, err := lab.Up(ctx, cfg)
	if err != nil {
		t.Fatalf("second up: %v", err)
	}
	if _, err := l2.QueryDNS(lab.Client, lab.Zone, dns.TypeSOA); err != nil {
		t.Fatalf("second lab's DNS: %v", err)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }
