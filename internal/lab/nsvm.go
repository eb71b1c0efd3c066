package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/vmhop/vmhop/internal/netns"
)

// NSVM is a stand-in VM: a network namespace whose eth0 plugs into a site
// through a veth ("tap"). Moving the veth's host end to another site moves
// the VM with its sockets intact, the way a live migration does, so network
// continuity can be tested without a guest (and much faster).
type NSVM struct {
	NS  string           // the VM's namespace
	Tap string           // host end of the VM's link
	MAC net.HardwareAddr // the VM's eth0
	IP  netip.Addr
}

// StartNSVM creates the stand-in VM at site A with OldIP, gateway GatewayA,
// plugged into site A's bridge.
func (l *Lab) StartNSVM(ctx context.Context) (*NSVM, error) {
	v := &NSVM{NS: l.NS("vm"), Tap: "tap-nsvm", IP: OldIP}
	if err := netns.Create(v.NS); err != nil {
		return nil, err
	}
	steps := []struct {
		ns   string
		args []string
	}{
		{l.NS(SiteA), []string{"link", "add", v.Tap, "type", "veth", "peer", "name", "eth0", "netns", v.NS}},
		{v.NS, []string{"link", "set", "lo", "up"}},
		{v.NS, []string{"link", "set", "eth0", "address", "52:54:00:00:0a:0a", "up"}},
		{v.NS, []string{"addr", "add", OldIP.String() + "/24", "dev", "eth0"}},
		{v.NS, []string{"route", "add", "default", "via", GatewayA.String()}},
		{l.NS(SiteA), []string{"link", "set", v.Tap, "master", LANIf(SiteA), "up"}},
	}
	for _, s := range steps {
		if _, err := netns.Run(ctx, s.ns, "ip", s.args...); err != nil {
			return nil, err
		}
	}
	v.MAC, _ = net.ParseMAC("52:54:00:00:0a:0a")
	return v, nil
}

// Unplug takes the VM's link off site A: from now on packets for it at
// site A have nowhere to go (the VM is "paused" and leaving).
func (l *Lab) UnplugNSVM(ctx context.Context, v *NSVM) error {
	_, err := netns.Run(ctx, l.NS(SiteA), "ip", "link", "set", v.Tap, "netns", l.NS(SiteB))
	return err
}

// PlugNSVM brings the VM's link up at site B, not bridged: the datapath
// delivers to it directly.
func (l *Lab) PlugNSVM(ctx context.Context, v *NSVM) (int, error) {
	if _, err := netns.Run(ctx, l.NS(SiteB), "ip", "link", "set", v.Tap, "up"); err != nil {
		return 0, err
	}
	var idx int
	err := netns.Do(l.NS(SiteB), func() error {
		ifi, err := net.InterfaceByName(v.Tap)
		if err != nil {
			return err
		}
		idx = ifi.Index
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("plug vm at site B: %w", err)
	}
	return idx, nil
}
