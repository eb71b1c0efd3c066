package wgpath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
)

// VM is a moved VM's entry on the destination host.
type VM struct {
	OldIP, NewIP netip.Addr
	// GatewayMAC is the old gateway's MAC: the tap's host side takes it,
	// so the frames the VM sends to its cached gateway reach this host.
	GatewayMAC net.HardwareAddr
	MAC        net.HardwareAddr // the VM's
	Tap        string           // the VM's tap on this host, on no bridge
	// Token is the migration's tunnel back to the source (OpenTunnel);
	// 0: none (drained), the VM's traffic is all NATed.
	Token uint64
}

type vmEntry struct {
	VM
	origMAC net.HardwareAddr // the tap's before SetVM
	uplink  string           // where new_ip is answered for
	rule    *netlink.Rule    // fwmark -> the tunnel's table, while Token != 0
	held    []string         // sysctls held
}

// SetVM installs or updates the VM's entry: old_ip/32 routed to the tap
// (a permanent neighbour entry at the VM's MAC), the tap's host side at
// the old gateway's MAC and answering ARP for every address routed
// elsewhere (proxy ARP, no delay), new_ip answered for on the uplink
// (proxy neighbour; a /32 route to the tap makes it not on-link there)
// and NATed to old_ip, and with a Token, the VM's packets that are not
// NAT flows policy-routed into the tunnel. Calling it again with Token 0
// (the drain) removes the tunnel part only.
func (p *Path) SetVM(v VM) error {
	if !v.OldIP.Is4() || !v.NewIP.Is4() {
		return fmt.Errorf("wgpath: vm %s -> %s: IPv4 only", v.OldIP, v.NewIP)
	}
	if len(v.MAC) != 6 || len(v.GatewayMAC) != 6 {
		return fmt.Errorf("wgpath: vm %s: want 6-byte VM and gateway MACs", v.OldIP)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var t *tunnel
	if v.Token != 0 {
		if t = p.tunnels[v.Token]; t == nil {
			return fmt.Errorf("wgpath: vm %s: no tunnel %s", v.OldIP, TunnelName(v.Token))
		}
	}
	h, err := p.handle()
	if err != nil {
		return err
	}
	defer h.Close()
	e := p.vms[v.OldIP]
	fresh := e == nil
	if fresh {
		e = &vmEntry{VM: v}
		p.vms[v.OldIP] = e
	} else if e.Tap != v.Tap {
		return fmt.Errorf("wgpath: vm %s: on tap %s already, not %s", v.OldIP, e.Tap, v.Tap)
	}
	e.VM = v
	if err := p.setVM(h, e, t, fresh); err != nil {
		if fresh {
			p.removeVM(h, e)
			delete(p.vms, v.OldIP)
		}
		return fmt.Errorf("wgpath: vm %s: %w", v.OldIP, err)
	}
	return nil
}

func (p *Path) setVM(h *netlink.Handle, e *vmEntry, t *tunnel, fresh bool) error {
	tap, err := h.LinkByName(e.Tap)
	if err != nil {
		return fmt.Errorf("tap %s: %w", e.Tap, err)
	}
	if fresh && tap.Attrs().MasterIndex != 0 {
		// Bridged, its packets never reach this host's routing: the
		// entry routes to the tap and answers ARP on it.
		return fmt.Errorf("tap %s is on a bridge: userspace continuity needs the VM's tap on none (destination.tap without destination.bridge)", e.Tap)
	}
	if fresh {
		up, err := p.uplink(h)
		if err != nil {
			return err
		}
		e.uplink = up.Attrs().Name
		e.origMAC = tap.Attrs().HardwareAddr
		if err := h.LinkSetHardwareAddr(tap, e.GatewayMAC); err != nil {
			return fmt.Errorf("tap %s: gateway MAC: %w", e.Tap, err)
		}
		for _, s := range []struct{ path, v string }{
			{"net/ipv4/conf/" + e.Tap + "/forwarding", "1"},
			{"net/ipv4/conf/" + e.Tap + "/proxy_arp", "1"},
			{"net/ipv4/neigh/" + e.Tap + "/proxy_delay", "0"},
			{"net/ipv4/conf/" + e.uplink + "/forwarding", "1"},
			{"net/ipv4/neigh/" + e.uplink + "/proxy_delay", "0"},
		} {
			if err := p.hold(s.path, s.v); err != nil {
				return err
			}
			e.held = append(e.held, s.path)
		}
		for _, ip := range []netip.Addr{e.OldIP, e.NewIP} {
			if err := h.RouteReplace(&netlink.Route{Dst: host32(ip), LinkIndex: tap.Attrs().Index, Scope: netlink.SCOPE_LINK, Protocol: RouteProtocol}); err != nil {
				return fmt.Errorf("route %s to %s: %w", ip, e.Tap, err)
			}
		}
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: tap.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
			IP: net.IP(ip4(e.OldIP)), HardwareAddr: e.MAC}); err != nil {
			return fmt.Errorf("neighbour %s on %s: %w", e.OldIP, e.Tap, err)
		}
		if err := h.NeighSet(&netlink.Neigh{LinkIndex: up.Attrs().Index, Family: netlink.FAMILY_V4, Flags: netlink.NTF_PROXY,
			IP: net.IP(ip4(e.NewIP))}); err != nil {
			return fmt.Errorf("answer ARP for %s on %s: %w", e.NewIP, e.uplink, err)
		}
		if err := p.garp(e.uplink, e.NewIP, up.Attrs().HardwareAddr); err != nil {
			p.opts.Log.Warn("userspace continuity: gratuitous ARP", "addr", e.NewIP, "dev", e.uplink, "err", err)
		}
	}
	tunName, mark := "", uint32(0)
	if t != nil {
		tunName, mark = t.name, t.mark
		// The tunnel's rule before the table that marks packets for it: a
		// VM packet marked while no rule sends the mark into the tunnel
		// leaves through the uplink, is SNATed to new_ip there, and
		// conntrack keeps that binding for the flow's life: the client
		// gets the rest of an old connection from new_ip and resets it.
		if err := p.setVMRule(h, e, t); err != nil {
			return err
		}
	}
	if err := p.withNft(func(c *nftables.Conn) error {
		return setVMTable(c, vmTable(e.OldIP), buildVMRules(e.VM, tunName, mark), !fresh)
	}); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if t == nil {
		return p.setVMRule(h, e, nil) // the drain: the rule after the table stopped marking
	}
	return nil
}

// setVMRule points the tunnel's mark at its table (default route into
// the TUN), or removes the rule without a tunnel.
func (p *Path) setVMRule(h *netlink.Handle, e *vmEntry, t *tunnel) error {
	if e.rule != nil && (t == nil || e.rule.Mark != t.mark) {
		if err := h.RuleDel(e.rule); err != nil && !isNotFound(err) {
			return fmt.Errorf("rule fwmark %#x: %w", e.rule.Mark, err)
		}
		h.RouteDel(&netlink.Route{Dst: &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}, Table: e.rule.Table})
		e.rule = nil
	}
	if t == nil || e.rule != nil {
		return nil
	}
	if err := h.RouteReplace(&netlink.Route{Dst: &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)},
		LinkIndex: t.index, Scope: netlink.SCOPE_LINK, Table: int(t.mark), Protocol: RouteProtocol}); err != nil {
		return fmt.Errorf("table %#x: default into %s: %w", t.mark, t.name, err)
	}
	r := netlink.NewRule()
	r.Family = netlink.FAMILY_V4
	r.Mark = t.mark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Table = int(t.mark)
	r.Priority = RulePriority
	if err := h.RuleAdd(r); err != nil {
		return fmt.Errorf("rule fwmark %#x: %w", t.mark, err)
	}
	e.rule = r
	return nil
}

// RulePriority is the priority of the policy rules that send a VM's
// marked packets into its tunnel (before the main table's 32766).
const RulePriority = 1000

// RemoveVM removes the VM's entry (old_ip, new_ip). An entry this Path
// did not make (a vmhopd that stopped made it: the kernel kept it, the
// VM ran on) is removed by name and mark: its table, its routes to
// old_ip and new_ip (RouteProtocol), new_ip's proxy neighbour and the
// rules of its tunnel; the tap keeps the gateway's MAC and its sysctls.
// None at all is no error.
func (p *Path) RemoveVM(old, new netip.Addr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	h, err := p.handle()
	if err != nil {
		return err
	}
	defer h.Close()
	e := p.vms[old]
	if e == nil {
		return p.removeUnknownVM(h, old, new)
	}
	delete(p.vms, old)
	return p.removeVM(h, e)
}

func (p *Path) removeUnknownVM(h *netlink.Handle, old, new netip.Addr) error {
	var errs []error
	errs = append(errs, p.withNft(func(c *nftables.Conn) error { return delTable(c, vmTable(old)) }))
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	errs = append(errs, err)
	for _, r := range routes {
		if r.Dst == nil || (!r.Dst.IP.Equal(net.IP(ip4(old))) && (!new.IsValid() || !r.Dst.IP.Equal(net.IP(ip4(new))))) {
			continue
		}
		rr := r
		if err := h.RouteDel(&rr); err != nil && !isNotFound(err) {
			errs = append(errs, err)
		}
	}
	if new.IsValid() {
		proxies, _ := h.NeighProxyList(0, netlink.FAMILY_V4)
		for _, n := range proxies {
			if n.IP.Equal(net.IP(ip4(new))) {
				nn := n
				errs = append(errs, h.NeighDel(&nn))
			}
		}
	}
	return errors.Join(errs...)
}

func (p *Path) removeVM(h *netlink.Handle, e *vmEntry) error {
	var errs []error
	errs = append(errs, p.setVMRule(h, e, nil))
	errs = append(errs, p.withNft(func(c *nftables.Conn) error { return delTable(c, vmTable(e.OldIP)) }))
	for _, ip := range []netip.Addr{e.OldIP, e.NewIP} {
		if err := h.RouteDel(&netlink.Route{Dst: host32(ip), Scope: netlink.SCOPE_LINK}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("route %s: %w", ip, err))
		}
	}
	if tap, err := h.LinkByName(e.Tap); err == nil {
		if err := h.NeighDel(&netlink.Neigh{LinkIndex: tap.Attrs().Index, Family: netlink.FAMILY_V4,
			IP: net.IP(ip4(e.OldIP))}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("neighbour %s: %w", e.OldIP, err))
		}
		if len(e.origMAC) == 6 {
			errs = append(errs, h.LinkSetHardwareAddr(tap, e.origMAC))
		}
	}
	if up, err := h.LinkByName(e.uplink); err == nil {
		if err := h.NeighDel(&netlink.Neigh{LinkIndex: up.Attrs().Index, Family: netlink.FAMILY_V4, Flags: netlink.NTF_PROXY,
			IP: net.IP(ip4(e.NewIP))}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("proxy neighbour %s: %w", e.NewIP, err))
		}
	}
	for i := len(e.held) - 1; i >= 0; i-- {
		errs = append(errs, p.release(e.held[i]))
	}
	e.held = nil
	return errors.Join(errs...)
}

// RouteProtocol marks the routes this package adds (ip route's "proto
// 118"), so Sweep finds them.
const RouteProtocol = 118

// Sweep removes what a Path in a process that died left in namespace ns
// ("": this process's): with vmEntries, everything: the nftables tables of
// its tunnels and VM entries, its policy rules and its routes (by
// RouteProtocol), and a destination's proxy neighbour for new_ip;
// without, only what belonged to its tunnels (their tables, rules and
// routing tables), which died with it, leaving the entries of VMs that
// moved in and run on (a restarted vmhopd calls it so). Its TUN devices
// went with the process (any left are deleted). A source's proxy
// neighbour for old_ip and held sysctls carry no mark and stay. It
// answers what it removed. Never call it while a Path of this host runs.
func Sweep(ns string, vmEntries bool) ([]string, error) {
	var gone []string
	var errs []error
	errs = append(errs, withNft(ns, func(c *nftables.Conn) error {
		ts, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
		if err != nil {
			return err
		}
		for _, t := range ts {
			if strings.HasPrefix(t.Name, "vhwg") || (vmEntries && strings.HasPrefix(t.Name, "vmhop_vm_")) {
				c.DelTable(t)
				gone = append(gone, "nftables table "+t.Name)
			}
		}
		return c.Flush()
	}))
	p := New(Options{Netns: ns})
	h, err := p.handle()
	if err != nil {
		return gone, errors.Join(append(errs, err)...)
	}
	defer h.Close()
	rules, err := h.RuleList(netlink.FAMILY_V4)
	errs = append(errs, err)
	for _, r := range rules {
		if r.Priority == RulePriority && r.Mark&0xffff0000 == markBase {
			rr := r
			errs = append(errs, h.RuleDel(&rr))
			gone = append(gone, fmt.Sprintf("rule %d fwmark %#x", r.Priority, r.Mark))
		}
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	errs = append(errs, err)
	proxies, _ := h.NeighProxyList(0, netlink.FAMILY_V4)
	for _, r := range routes {
		if !vmEntries && uint32(r.Table)&0xffff0000 != markBase {
			continue // a VM entry's route to its tap
		}
		rr := r
		if err := h.RouteDel(&rr); err != nil && !isNotFound(err) {
			errs = append(errs, err)
		}
		gone = append(gone, fmt.Sprintf("route %v table %d", r.Dst, r.Table))
		for _, n := range proxies { // new_ip's, answered for while routed to a tap
			if r.Dst != nil && n.IP.Equal(r.Dst.IP) {
				nn := n
				errs = append(errs, h.NeighDel(&nn))
				gone = append(gone, fmt.Sprintf("proxy neighbour %s", n.IP))
			}
		}
	}
	links, err := h.LinkList()
	errs = append(errs, err)
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "vhwg") {
			errs = append(errs, h.LinkDel(l))
			gone = append(gone, "link "+l.Attrs().Name)
		}
	}
	return gone, errors.Join(errs...)
}
