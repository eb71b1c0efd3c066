package migrator_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

// echoByte is byte i of the stream the echo test sends: position
// dependent, so a lost, repeated or reordered byte shows.
func echoByte(i int64) byte { return byte(i*7 + i/251) }

// echoStream writes a known byte sequence on an echo connection, chunk
// bytes every interval, and checks every byte that comes back.
type echoStream struct {
	c        net.Conn
	mu       sync.Mutex
	sent     int64
	echoed   int64
	bad      string        // the first wrong byte, if any
	longest  time.Duration // longest wait between two reads while bytes were outstanding
	lastRead time.Time
	stop     chan struct{}
	done     sync.WaitGroup
}

func startEcho(c net.Conn, chunk int, every time.Duration) *echoStream {
	e := &echoStream{c: c, stop: make(chan struct{}), lastRead: time.Now()}
	e.done.Add(2)
	go func() {
		defer e.done.Done()
		buf := make([]byte, chunk)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-e.stop:
				return
			case <-tick.C:
			}
			e.mu.Lock()
			for i := range buf {
				buf[i] = echoByte(e.sent + int64(i))
			}
			e.mu.Unlock()
			n, err := c.Write(buf)
			e.mu.Lock()
			e.sent += int64(n)
			e.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer e.done.Done()
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			now := time.Now()
			e.mu.Lock()
			if gap := now.Sub(e.lastRead); gap > e.longest && n > 0 {
				e.longest = gap
			}
			e.lastRead = now
			for i := range n {
				if e.bad == "" && buf[i] != echoByte(e.echoed+int64(i)) {
					e.bad = fmt.Sprintf("byte %d: got %#x, want %#x", e.echoed+int64(i), buf[i], echoByte(e.echoed+int64(i)))
				}
			}
			e.echoed += int64(n)
			e.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return e
}

// finish stops writing, waits up to wait for every byte to come back,
// and closes the connection.
func (e *echoStream) finish(wait time.Duration) (sent, echoed int64, bad string, longest time.Duration) {
	close(e.stop)
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		e.mu.Lock()
		all := e.echoed >= e.sent
		e.mu.Unlock()
		if all {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.c.Close()
	e.done.Wait()
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sent, e.echoed, e.bad, e.longest
}

// hostState is what a host's network looks like, for a before/after
// comparison: links (name, MAC), IPv4 routes of every table, policy
// rules, proxy neighbour entries, the package's nftables tables, and the
// sysctls userspace continuity may change on its interfaces.
func hostState(t *testing.T, ns string) []string {
	t.Helper()
	nsh, err := netns.Handle(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var out []string
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
		out = append(out, fmt.Sprintf("link %s %s", l.Attrs().Name, l.Attrs().HardwareAddr))
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 0}, netlink.RT_FILTER_TABLE)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		out = append(out, fmt.Sprintf("route table %d %v dev %d via %v", r.Table, r.Dst, r.LinkIndex, r.Gw))
	}
	rules, err := h.RuleList(netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		out = append(out, fmt.Sprintf("rule %d mark %#x table %d", r.Priority, r.Mark, r.Table))
	}
	neighs, err := h.NeighProxyList(0, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		out = append(out, fmt.Sprintf("proxy neighbour %s dev %d", n.IP, n.LinkIndex))
	}
	tables, err := wgpath.Tables(ns)
	if err != nil {
		t.Fatal(err)
	}
	for _, tb := range tables {
		out = append(out, "nft table "+tb)
	}
	if err := netns.Do(ns, func() error {
		for _, n := range names {
			for _, f := range []string{"ipv4/conf/" + n + "/forwarding", "ipv4/conf/" + n + "/proxy_arp", "ipv4/neigh/" + n + "/proxy_delay"} {
				if b, err := os.ReadFile("/proc/sys/net/" + f); err == nil {
					out = append(out, f+"="+strings.TrimSpace(string(b)))
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// sameState fails t with the differences between two hostStates.
func sameState(t *testing.T, what string, before, after []string) {
	t.Helper()
	var gone, left []string
	for _, s := range before {
		if !slices.Contains(after, s) {
			gone = append(gone, s)
		}
	}
	for _, s := range after {
		if !slices.Contains(before, s) {
			left = append(left, s)
		}
	}
	if len(gone)+len(left) > 0 {
		t.Errorf("%s: changed by the migration:\n  left: %s\n  gone: %s", what, strings.Join(left, "\n        "), strings.Join(gone, "\n        "))
	}
}

// TestMigrationUserspace moves the lab guest with eBPF off on both hosts
// (userspace continuity: WireGuard tunnel, routes, proxy ARP, nftables
// NAT) while an echo connection opened before the move sends a known
// byte sequence before, during and after it: every byte must come back,
// in order, on the same connection. Then: the guest answers at both
// addresses (new connections through the tunnel and through the NAT),
// the drain removes the tunnel on both hosts and leaves host A as it
// was, and removing the VM entry leaves host B as it was; no BPF was
// pinned on either host.
func TestMigrationUserspace(t *testing.T) {
	labtest.RequireTools(t, "tcpdump")
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartVM(ctx, lab.VMConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitGuest(ctx, vm.IP, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(testWriter{t}, nil))
	p, err := labrun.Plan(ctx, l, vm, spec(t), log, labrun.Continuity(migrator.ContinuityUserspace))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { labrun.Cleanup(p) })
	if err := wgpath.Check(l.NS(lab.SiteA)); err != nil {
		t.Skipf("userspace continuity cannot run here: %v", err)
	}
	stateA, stateB := hostState(t, l.NS(lab.SiteA)), hostState(t, l.NS(lab.SiteB))
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}

	c, err := l.DialTCP(ctx, lab.Client, netip.AddrPortFrom(lab.OldIP, 7))
	if err != nil {
		t.Fatal(err)
	}
	echo := startEcho(c, 100, 10*time.Millisecond)
	time.Sleep(2 * time.Second)
	rep, err := migrator.Run(ctx, p)
	if err != nil {
		echo.finish(time.Second)
		t.Fatalf("migrate: %v", err)
	}
	for _, ph := range rep.Phases {
		t.Logf("phase %-14s %s", ph.Name, ph.Duration.Round(time.Millisecond))
	}
	t.Logf("total %s, pause %s, health %s, redirected %v", rep.Total.Round(time.Millisecond), rep.Pause, rep.Health, rep.Redirected)
	time.Sleep(3 * time.Second) // the connection goes on through the tunnel
	sent, echoed, bad, longest := echo.finish(20 * time.Second)
	t.Logf("echo connection opened before the move: %d bytes sent, %d echoed, longest wait between replies %s",
		sent, echoed, longest.Round(time.Millisecond))
	if bad != "" || echoed != sent || sent < 10000 {
		t.Errorf("echo stream across the move: %d sent, %d echoed, first wrong byte: %q", sent, echoed, bad)
		if os.Getenv("VMHOP_DEBUG") != "" {
			debugCapture(t, l)
		}
	}
	if rep.Redirected["encap_packets"] == 0 || rep.Redirected["decap_packets"] == 0 {
		t.Errorf("redirect counters %v: nothing went through the tunnel", rep.Redirected)
	}

	// New connections: to the old address (through the tunnel) and to
	// the new one (NAT at host B).
	for _, ip := range []netip.Addr{lab.OldIP, lab.NewIP} {
		if err := l.Echo(ctx, lab.Client, ip, []byte("a new connection to "+ip.String())); err != nil {
			t.Errorf("new echo connection to %s after the move: %v", ip, err)
		}
	}
	if g := labrun.CheckGuest(ctx, l, lab.NewIP, before); !g.OK() {
		t.Fatalf("guest at site B: %s", g.Problem)
	}

	p.DrainIdle = time.Second
	if took, err := migrator.Drain(ctx, p); err != nil || took > 15*time.Second {
		t.Fatalf("drain: %v after %s", err, took)
	}
	if _, err := l.GuestStatus(ctx, lab.Client, lab.NewIP); err != nil {
		t.Fatalf("guest via new ip after drain: %v", err)
	}
	sameState(t, "host A after the drain", stateA, hostState(t, l.NS(lab.SiteA)))
	afterB := hostState(t, l.NS(lab.SiteB))
	for _, s := range afterB {
		if strings.HasPrefix(s, "link vhwg") || strings.HasPrefix(s, fmt.Sprintf("rule %d ", wgpath.RulePriority)) {
			t.Errorf("host B after the drain: the tunnel is left: %s", s)
		}
	}
	if !slices.Contains(afterB, "nft table vmhop_vm_10_1_0_10") {
		t.Errorf("host B after the drain: the VM's NAT entry is gone while the VM runs there")
	}
	if err := labrun.Cleanup(p); err != nil {
		t.Fatal(err)
	}
	sameState(t, "host B after the VM entry is removed", stateB, hostState(t, l.NS(lab.SiteB)))
	for _, site := range []string{lab.SiteA, lab.SiteB} {
		if ents, err := os.ReadDir(l.PinDir(site)); err == nil && len(ents) > 0 {
			t.Errorf("%s: BPF pins made in userspace mode: %v", site, ents)
		}
	}
}

// debugCapture logs what both hosts see of a new echo connection to the
// old address (VMHOP_DEBUG=1).
func debugCapture(t *testing.T, l *lab.Lab) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	outs := map[string]string{}
	var mu sync.Mutex
	for _, site := range []string{lab.SiteA, lab.SiteB, lab.Client} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, _ := netns.Command(ctx, l.NS(site), "tcpdump", "-lUnnei", "any", "-c", "40", "host 10.1.0.10 or host 10.2.0.10 or icmp").CombinedOutput()
			mu.Lock()
			outs[site] = string(out)
			mu.Unlock()
		}()
	}
	time.Sleep(time.Second)
	err := l.Echo(context.Background(), lab.Client, lab.OldIP, []byte("debug"))
	t.Logf("debug echo to old ip: %v", err)
	for _, site := range []string{lab.SiteA, lab.SiteB} {
		for _, cmd := range [][]string{{"ip", "-s", "link"}, {"ip", "rule"}, {"ip", "route", "show", "table", "all"}, {"ip", "neigh", "show", "proxy"}, {"ip", "neigh"}, {"nstat", "-az"}, {"sh", "-c", "grep -r . /proc/sys/net/ipv4/conf/*/rp_filter /proc/sys/net/ipv4/conf/*/forwarding"}} {
			out, _ := netns.Run(context.Background(), l.NS(site), cmd[0], cmd[1:]...)
			t.Logf("%s: %v:\n%s", site, cmd, out)
		}
	}
	wg.Wait()
	for site, out := range outs {
		t.Logf("%s capture:\n%s", site, out)
	}
}
