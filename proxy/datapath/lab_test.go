package datapath_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/proxy/datapath"
)

func TestMain(m *testing.M) {
	lab.RunChild()
	os.Exit(m.Run())
}

// hostDatapath loads and attaches the datapath on host's uplink.
func hostDatapath(t *testing.T, l *lab.Lab, host string, local netip.Addr) *datapath.Datapath {
	t.Helper()
	dp, err := datapath.Load(datapath.Options{LocalIP: local, PinDir: l.PinDir(host)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.Do(l.NS(host), dp.Remove) })
	if err := netns.Do(l.NS(host), func() error { return dp.Attach(datapath.Uplink, lab.Uplink) }); err != nil {
		t.Fatal(err)
	}
	return dp
}

// tunnelUp loads the datapath on both hosts and opens a tunnel between
// them for the stand-in VM, its redirect at host A still off (the
// migrator's state before the switch).
func tunnelUp(t *testing.T, l *lab.Lab, vm *lab.NSVM) (dpA, dpB *datapath.Datapath, token uint64) {
	t.Helper()
	dpA = hostDatapath(t, l, lab.SiteA, lab.HostA)
	dpB = hostDatapath(t, l, lab.SiteB, lab.HostB)
	token, err := datapath.NewToken()
	must(t, err)
	toA, toB := datapath.Tunnel{Peer: lab.HostA, Token: token}, datapath.Tunnel{Peer: lab.HostB, Token: token}
	must(t, dpA.SetPeer(toB, true))
	must(t, dpA.SetRedirect(lab.OldIP, toB, vm.MAC, false))
	must(t, dpB.SetPeer(toA, true))
	return dpA, dpB, token
}

// TestContinuityAcrossMove: connections made to the VM's old address before
// it moved keep working after it moved to site B (including bulk transfers
// with full-size packets in flight at the switch), new connections to the
// old address reach it through the tunnel, and the new address works both
// ways with the right source address.
func TestContinuityAcrossMove(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartNSVM(ctx)
	if err != nil {
		t.Fatal(err)
	}
	payload := labtest.Payload(8 << 20)
	labtest.ServeNSVM(t, vm.NS, payload)

	dpA, dpB, token := tunnelUp(t, l, vm)
	toB := datapath.Tunnel{Peer: lab.HostB, Token: token}

	// Before the move: an echo connection and two bulk transfers under way.
	tr := labtest.StartTransfers(t, l, payload, 60*time.Second)
	time.Sleep(1500 * time.Millisecond)

	// The move, in the order the migrator uses: the new host is ready before
	// the old host switches (one map write).
	must(t, l.UnplugNSVM(ctx, vm))
	switchAt := time.Now()
	tap, err := l.PlugNSVM(ctx, vm)
	must(t, err)
	gwMAC, err := l.RouterMAC(lab.SiteA)
	must(t, err)
	must(t, dpB.SetVM(datapath.VM{OldIP: lab.OldIP, NewIP: lab.NewIP, Gateway: lab.GatewayA, GatewayMAC: gwMAC,
		MAC: vm.MAC, Tap: tap, Peer: lab.HostA, Token: token}))
	must(t, netns.Do(l.NS(lab.SiteB), func() error { return dpB.Attach(datapath.VMTap, vm.Tap) }))
	must(t, dpA.SetRedirect(lab.OldIP, toB, vm.MAC, true))
	t.Logf("switched in %s", time.Since(switchAt).Round(time.Microsecond))

	tr.Check(t)
	labtest.CheckAddressesAfterMove(t, l, vm)

	ca, _ := dpA.Stats(lab.OldIP)
	cb, _ := dpB.Stats(lab.OldIP)
	t.Logf("host A counters: %v", nonzero(ca))
	t.Logf("host B counters: %v", nonzero(cb))
	if ca["encap_packets"] == 0 || ca["icmp_too_big"] == 0 || cb["decap_packets"] == 0 || cb["tunnel_back_packets"] == 0 ||
		cb["dnat_packets"] == 0 || cb["snat_packets"] == 0 || cb["arp_replies"] == 0 {
		t.Errorf("a path was not exercised: A %v, B %v", nonzero(ca), nonzero(cb))
	}
}

func nonzero(c datapath.Counters) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range c {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// moveNSVM moves the stand-in VM from site A to site B the way the migrator
// does (host B ready first, then the redirect on at host A) and makes the
// router forget the old address's MAC, so host A answers for it.
func moveNSVM(t *testing.T, l *lab.Lab, vm *lab.NSVM, dpA, dpB *datapath.Datapath, token uint64) {
	t.Helper()
	ctx := context.Background()
	must(t, l.UnplugNSVM(ctx, vm))
	tap, err := l.PlugNSVM(ctx, vm)
	must(t, err)
	gwMAC, err := l.RouterMAC(lab.SiteA)
	must(t, err)
	must(t, dpB.SetVM(datapath.VM{OldIP: lab.OldIP, NewIP: lab.NewIP, Gateway: lab.GatewayA, GatewayMAC: gwMAC,
		MAC: vm.MAC, Tap: tap, Peer: lab.HostA, Token: token}))
	must(t, netns.Do(l.NS(lab.SiteB), func() error { return dpB.Attach(datapath.VMTap, vm.Tap) }))
	must(t, dpA.SetRedirect(lab.OldIP, datapath.Tunnel{Peer: lab.HostB, Token: token}, vm.MAC, true))
	netns.Run(ctx, l.NS(lab.WAN), "ip", "neigh", "flush", lab.OldIP.String())
}

// dialFrom connects from ns, from local port port (SO_REUSEADDR, so a port
// in use toward another destination can be taken again, as clients do).
func dialFrom(ns string, port uint16, to netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := netns.Do(ns, func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{Port: int(port)},
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				rc.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
				return serr
			}}
		c, err = d.Dial("tcp", to.String())
		return err
	})
	return c, err
}

// tcpCounters reads the named counters of /proc/net/snmp ("Tcp" lines) and
// /proc/net/netstat ("TcpExt" lines) inside ns, e.g. "TcpExt:TCPSynRetrans".
func tcpCounters(t *testing.T, ns string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, f := range []string{"/proc/net/snmp", "/proc/net/netstat"} {
		text, err := netns.Run(context.Background(), ns, "cat", f)
		must(t, err)
		lines := strings.Split(text, "\n")
		for i := 0; i+1 < len(lines); i += 2 {
			names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			for j := 1; j < len(names) && j < len(vals); j++ {
				var v int64
				fmt.Sscan(vals[j], &v)
				out[names[0]+names[j]] = v
			}
		}
	}
	return out
}

// TestSharedTuples: at host B's NAT, two client flows never share one guest
// 4-tuple. (1) A client keeps a connection from port P to old_ip busy
// through the move, then connects from P to new_ip too: inside the VM both
// would be client:P -> old_ip; host B translates the second one's port, and
// both keep echoing for 10 s. (2) 20 connections to new_ip from ports just
// used toward old_ip (whose sockets the VM holds in TIME_WAIT), before the
// move (host A noted them, MoveFlows handed them over) and after it: none
// meets the TIME_WAIT socket, so the client sends no reset and no SYN again.
func TestSharedTuples(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartNSVM(ctx)
	must(t, err)
	labtest.ServeNSVM(t, vm.NS, nil)
	// 9003: says who called, then closes first (the VM's socket goes to TIME_WAIT).
	ln, err := netns.Listen(vm.NS, "tcp", ":9003")
	must(t, err)
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			c.Close()
		}
	}()

	dpA, dpB, token := tunnelUp(t, l, vm)

	// call9003 connects from port p to addr:9003 and returns what the VM
	// saw as the caller (it closes first: its socket goes to TIME_WAIT).
	call9003 := func(p uint16, to netip.Addr) string {
		t.Helper()
		c, err := dialFrom(l.NS(lab.Client), p, netip.AddrPortFrom(to, 9003))
		if err != nil {
			t.Fatalf("connect from port %d to %s: %v", p, to, err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("from port %d to %s: %v", p, to, err)
		}
		return strings.TrimSpace(string(line))
	}
	// Ports used toward old_ip before the move (host A notes them)...
	seen := map[string]string{}
	for i := range 20 {
		p := uint16(45000 + i)
		seen[fmt.Sprintf("%d->%s", p, lab.OldIP)] = call9003(p, lab.OldIP)
	}

	const port = 47007
	oldC, err := dialFrom(l.NS(lab.Client), port, netip.AddrPortFrom(lab.OldIP, labtest.EchoPort))
	must(t, err)
	defer oldC.Close()
	must(t, labtest.Echo(oldC, "before the move"))
	moveNSVM(t, l, vm, dpA, dpB, token)
	moved, err := datapath.MoveFlows(dpA, dpB, lab.OldIP)
	must(t, err)
	t.Logf("%d flows moved from host A to host B", moved)
	must(t, labtest.Echo(oldC, "after the move"))

	newC, err := dialFrom(l.NS(lab.Client), port, netip.AddrPortFrom(lab.NewIP, labtest.EchoPort))
	must(t, err)
	defer newC.Close()
	for end, i := time.Now().Add(10*time.Second), 0; time.Now().Before(end); i++ {
		if err := labtest.Echo(oldC, fmt.Sprintf("old %d", i)); err != nil {
			t.Fatalf("connection to old_ip from port %d, %d after the second one opened: %v", port, i, err)
		}
		if err := labtest.Echo(newC, fmt.Sprintf("new %d", i)); err != nil {
			t.Fatalf("connection to new_ip from port %d: %v", port, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// (2) ...and after it (host B sees them through the tunnel); then each
	// of the 40 ports toward new_ip.
	before := tcpCounters(t, l.NS(lab.Client))
	for i := range 20 {
		p := uint16(46000 + i)
		seen[fmt.Sprintf("%d->%s", p, lab.OldIP)] = call9003(p, lab.OldIP)
	}
	for i := range 20 {
		for _, p := range []uint16{uint16(45000 + i), uint16(46000 + i)} {
			seen[fmt.Sprintf("%d->%s", p, lab.NewIP)] = call9003(p, lab.NewIP)
		}
	}
	after := tcpCounters(t, l.NS(lab.Client))
	for _, k := range []string{"TcpExt:TCPSynRetrans", "Tcp:OutRsts", "Tcp:RetransSegs"} {
		if d := after[k] - before[k]; d != 0 {
			t.Errorf("client %s went up by %d over the 60 connections (want 0)", k, d)
		}
	}
	// The VM saw each new_ip connection from a port of its own: the old
	// one's TIME_WAIT tuple was not reused.
	for i := range 20 {
		for _, p := range []uint16{uint16(45000 + i), uint16(46000 + i)} {
			o, n := seen[fmt.Sprintf("%d->%s", p, lab.OldIP)], seen[fmt.Sprintf("%d->%s", p, lab.NewIP)]
			if o != fmt.Sprintf("%s:%d", lab.ClientIP, p) || n == o || !strings.HasPrefix(n, lab.ClientIP.String()+":") {
				t.Errorf("port %d: VM saw %q via old_ip and %q via new_ip", p, o, n)
			}
		}
	}
	cb, _ := dpB.Stats(lab.OldIP)
	t.Logf("host B counters: %v", nonzero(cb))
	if cb["nat_port_translated"] < 41 {
		t.Errorf("host B translated %d client ports, want >= 41", cb["nat_port_translated"])
	}
}
