package datapath

import (
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ProxyARP makes this host answer ARP for ip on dev, or stops it (in the
// calling thread's network namespace). The old host answers for the old
// address after the VM left; the new host answers for the new address.
// Needs IPv4 forwarding on (proxy entries answer only on forwarding hosts).
func ProxyARP(dev string, ip netip.Addr, on bool) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("proxy arp: lookup interface %q: %w", dev, err)
	}
	n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: unix.AF_INET, IP: net.IP(ip.AsSlice()), Flags: netlink.NTF_PROXY}
	if on {
		if b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/" + dev + "/forwarding"); len(b) > 0 && b[0] == '0' {
			return fmt.Errorf("proxy arp for %s on %q: IPv4 forwarding is off on it", ip, dev)
		}
		if err := netlink.NeighSet(n); err != nil {
			return fmt.Errorf("proxy arp for %s on %q: %w", ip, dev, err)
		}
		return nil
	}
	if err := netlink.NeighDel(n); err != nil && !os.IsNotExist(err) && err != unix.ENOENT {
		return fmt.Errorf("remove proxy arp for %s on %q: %w", ip, dev, err)
	}
	return nil
}
