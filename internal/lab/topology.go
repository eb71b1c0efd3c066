package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/lab/wanem"
	"github.com/vmhop/vmhop/internal/netns"
)

// access describes one host's link to the WAN router.
type access struct {
	host     string
	routerIf string       // interface name in the wan namespace
	router   netip.Prefix // router's address on that LAN
	hostIP   netip.Prefix
	bridged  bool // sites put their uplink in br0, so VM taps join the LAN
	// The LAN's IPv6 /64: the router's and the host's addresses (none
	// for the DNS host: the lab's DNS is reached over IPv4).
	router6, hostIP6 netip.Prefix
}

var accesses = []access{
	{Client, "c0", netip.MustParsePrefix("10.0.0.1/24"), netip.PrefixFrom(ClientIP, 24), false,
		netip.MustParsePrefix("fd00:10::1/64"), netip.PrefixFrom(ClientIP6, 64)},
	{DNS, "d0", netip.MustParsePrefix("10.0.3.1/24"), netip.PrefixFrom(DNSIP, 24), false, netip.Prefix{}, netip.Prefix{}},
	{SiteA, "a0", netip.PrefixFrom(GatewayA, 24), netip.PrefixFrom(HostA, 24), true,
		netip.PrefixFrom(GatewayA6, 64), netip.PrefixFrom(HostA6, 64)},
	{SiteB, "b0", netip.PrefixFrom(GatewayB, 24), netip.PrefixFrom(HostB, 24), true,
		netip.MustParsePrefix("fd00:2::1/64"), netip.PrefixFrom(HostB6, 64)},
}

// LANIf is the interface carrying a host's own address: br0 on the sites, eth0 elsewhere.
func LANIf(host string) string {
	if host == SiteA || host == SiteB {
		return "br0"
	}
	return "eth0"
}

// Uplink is the host's interface towards the WAN (on sites, a port of br0).
const Uplink = "eth0"

// handle is a netlink handle bound to one lab namespace.
type handle struct {
	*netlink.Handle
	ns   vns.NsHandle
	name string
}

func (l *Lab) handle(host string) (*handle, error) {
	ns, err := netns.Handle(l.NS(host))
	if err != nil {
		return nil, err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlink in %q: %w", l.NS(host), err)
	}
	return &handle{Handle: h, ns: ns, name: l.NS(host)}, nil
}

func (h *handle) close() { h.Handle.Close(); h.ns.Close() }

func (h *handle) up(name string) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("%s: lookup %q: %w", h.name, name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("%s: set %q up: %w", h.name, name, err)
	}
	return nil
}

func (h *handle) addr(dev string, p netip.Prefix) error {
	link, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("%s: lookup %q: %w", h.name, dev, err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD // usable at once: the lab has no duplicates
	}
	if err := h.AddrAdd(link, a); err != nil {
		return fmt.Errorf("%s: add %s to %q: %w", h.name, p, dev, err)
	}
	return nil
}

func (h *handle) defaultVia(gw netip.Addr) error {
	r := &netlink.Route{Gw: gw.AsSlice()}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("%s: default route via %s: %w", h.name, gw, err)
	}
	return nil
}

// veth creates a pair with end a (named an) in host ha and end b (bn) in hb.
func (l *Lab) veth(ha, an, hb, bn string) error {
	nsa, err := netns.Handle(l.NS(ha))
	if err != nil {
		return err
	}
	defer nsa.Close()
	nsb, err := netns.Handle(l.NS(hb))
	if err != nil {
		return err
	}
	defer nsb.Close()
	la := netlink.NewLinkAttrs()
	la.Name, la.Namespace, la.MTU = an, netlink.NsFd(nsa), 1500
	v := &netlink.Veth{LinkAttrs: la, PeerName: bn, PeerNamespace: netlink.NsFd(nsb)}
	if err := netlink.LinkAdd(v); err != nil {
		return fmt.Errorf("veth %s:%s <-> %s:%s: %w", ha, an, hb, bn, err)
	}
	return nil
}

// offloadsOff turns off what breaks a userspace frame forwarder: GSO/TSO/GRO
// (frames above the MTU) and tx checksum offload (unfinished checksums).
func (l *Lab) offloadsOff(ctx context.Context, host, dev string) error {
	_, err := netns.Run(ctx, l.NS(host), "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off")
	return err
}

func (l *Lab) sysctl(host, key, val string) error {
	return netns.Do(l.NS(host), func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(val), 0o644)
	})
}

func (l *Lab) buildTopology(ctx context.Context) error {
	for _, host := range []string{Client, DNS, SiteA, SiteB, WAN, Wire} {
		if err := netns.Create(l.NS(host)); err != nil {
			return err
		}
	}
	hs := map[string]*handle{}
	defer func() {
		for _, h := range hs {
			h.close()
		}
	}()
	for _, host := range []string{Client, DNS, SiteA, SiteB, WAN, Wire} {
		h, err := l.handle(host)
		if err != nil {
			return err
		}
		hs[host] = h
		if err := h.up("lo"); err != nil {
			return err
		}
	}
	if err := l.sysctl(WAN, "net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	if err := l.sysctl(WAN, "net/ipv6/conf/all/forwarding", "1"); err != nil {
		return err
	}
	for _, a := range accesses {
		if p, ok := l.State.Links[a.host]; ok && p != (wanem.Profile{}) {
			// host:eth0 <-> wire:<r>h ... emulator ... wire:<r>w <-> wan:<r>
			wh, ww := a.routerIf+"h", a.routerIf+"w"
			if err := l.veth(a.host, Uplink, Wire, wh); err != nil {
				return err
			}
			if err := l.veth(Wire, ww, WAN, a.routerIf); err != nil {
				return err
			}
			for _, e := range []struct{ host, dev string }{{a.host, Uplink}, {Wire, wh}, {Wire, ww}, {WAN, a.routerIf}} {
				if err := l.offloadsOff(ctx, e.host, e.dev); err != nil {
					return err
				}
			}
			if err := hs[Wire].up(wh); err != nil {
				return err
			}
			if err := hs[Wire].up(ww); err != nil {
				return err
			}
		} else if err := l.veth(a.host, Uplink, WAN, a.routerIf); err != nil {
			return err
		}
		h := hs[a.host]
		if err := hs[WAN].addr(a.routerIf, a.router); err != nil {
			return err
		}
		if err := hs[WAN].up(a.routerIf); err != nil {
			return err
		}
		lan := LANIf(a.host)
		if a.bridged {
			br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: lan}}
			if err := h.LinkAdd(br); err != nil {
				return fmt.Errorf("%s: add bridge: %w", h.name, err)
			}
			up, err := h.LinkByName(Uplink)
			if err != nil {
				return err
			}
			if err := h.LinkSetMaster(up, br); err != nil {
				return fmt.Errorf("%s: enslave %s: %w", h.name, Uplink, err)
			}
			if err := h.up(Uplink); err != nil {
				return err
			}
			if err := l.sysctl(a.host, "net/ipv4/ip_forward", "1"); err != nil {
				return err
			}
			// IPv6 forwarding on every interface, taps made later too:
			// the datapath's IPv6 FIB lookups need it on the device a
			// packet came in on.
			for _, k := range []string{"net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/forwarding"} {
				if err := l.sysctl(a.host, k, "1"); err != nil {
					return err
				}
			}
		}
		if err := h.addr(lan, a.hostIP); err != nil {
			return err
		}
		if err := h.up(lan); err != nil {
			return err
		}
		if err := h.defaultVia(a.router.Addr()); err != nil {
			return err
		}
		if a.router6.IsValid() {
			if err := hs[WAN].addr(a.routerIf, a.router6); err != nil {
				return err
			}
			if err := h.addr(lan, a.hostIP6); err != nil {
				return err
			}
			if err := h.defaultVia(a.router6.Addr()); err != nil {
				return err
			}
		}
	}
	// Hosts resolve through the lab's BIND (ip netns exec bind-mounts this file).
	for _, host := range []string{Client, SiteA, SiteB} {
		dir := filepath.Join("/etc/netns", l.NS(host))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver "+DNSIP.String()+"\n"), 0o644); err != nil {
			return err
		}
	}
	return nil
}
