package wgpath

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
)

// The lab tests of the packet path, with the lab's stand-in VM (a
// namespace behind a veth, moved from site A to site B by moving the
// veth): fast, and exact about bytes.

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestContinuityAcrossMove: with userspace continuity on both hosts (no
// BPF anywhere), connections made to the VM's old address before it
// moved keep working after it moved to site B, bulk transfers both ways
// with full-size packets in flight included (the tunnel's MTU is 80
// bytes under the links': path MTU discovery and the MSS clamp carry
// them); new connections to the old address reach it through the
// tunnel; the new address works both ways (NAT); the VM's own new
// connection leaves from new_ip. Then everything is removed and neither
// host keeps anything.
func TestContinuityAcrossMove(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartNSVM(ctx)
	must(t, err)
	payload := labtest.Payload(8 << 20)
	labtest.ServeNSVM(t, vm.NS, payload)

	a := New(Options{Netns: l.NS(lab.SiteA), LocalIP: lab.HostA})
	b := New(Options{Netns: l.NS(lab.SiteB), LocalIP: lab.HostB})
	t.Cleanup(func() { a.Close(); b.Close() })
	const token = 0x0123456789abcdef
	// The migrator's order: B's end first, then A's with B as its peer,
	// then B's VM entry with A as its peer (its keepalive starts the
	// handshake).
	keyB, portB, err := b.OpenTunnel(token)
	must(t, err)
	keyA, portA, err := a.OpenTunnel(token)
	must(t, err)
	must(t, a.SetPeer(token, Peer{Key: keyB, Endpoint: netip.AddrPortFrom(lab.HostB, portB),
		Allowed: []netip.Prefix{netip.PrefixFrom(lab.OldIP, 32)}}))
	must(t, a.SetRedirect(lab.OldIP, token, vm.MAC, false))
	// B knows A (AttachVM in the migrator, long before the switch): its
	// keepalive makes the handshake.
	must(t, b.SetPeer(token, Peer{Key: keyA, Endpoint: netip.AddrPortFrom(lab.HostA, portA),
		Allowed: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, Keepalive: 25 * time.Second}))
	waitHandshake(t, a, token)

	tr := labtest.StartTransfers(t, l, payload, 90*time.Second)
	time.Sleep(1500 * time.Millisecond)

	must(t, l.UnplugNSVM(ctx, vm))
	switchAt := time.Now()
	_, err = l.PlugNSVM(ctx, vm)
	must(t, err)
	gwMAC, err := l.RouterMAC(lab.SiteA)
	must(t, err)
	must(t, b.SetVM(VM{OldIP: lab.OldIP, NewIP: lab.NewIP, GatewayMAC: gwMAC, MAC: vm.MAC, Tap: vm.Tap, Token: token}))
	must(t, a.SetRedirect(lab.OldIP, token, vm.MAC, true))
	t.Logf("switched in %s", time.Since(switchAt).Round(time.Microsecond))

	tr.Check(t)
	labtest.CheckAddressesAfterMove(t, l, vm)
	c, idle, any, err := a.RedirectStats(lab.OldIP)
	must(t, err)
	t.Logf("host A: %v, last packet into the tunnel %s ago", c, idle.Round(time.Millisecond))
	if !any || c["encap_packets"] == 0 || c["decap_packets"] == 0 {
		t.Errorf("host A's tunnel carried nothing: %v", c)
	}

	// The drain's order, then the VM entry: nothing is left.
	must(t, a.RemoveRedirect(lab.OldIP))
	must(t, b.SetVM(VM{OldIP: lab.OldIP, NewIP: lab.NewIP, GatewayMAC: gwMAC, MAC: vm.MAC, Tap: vm.Tap}))
	must(t, a.CloseTunnel(token))
	must(t, b.CloseTunnel(token))
	nu, err := l.DialTCP(ctx, lab.Client, netip.AddrPortFrom(lab.NewIP, labtest.EchoPort))
	must(t, err)
	must(t, labtest.Echo(nu, "new address after the drain"))
	nu.Close()
	must(t, b.RemoveVM(lab.OldIP, lab.NewIP))
	assertClean(t, l.NS(lab.SiteA))
	assertClean(t, l.NS(lab.SiteB))
}
