package wgpath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// redirect is the source host's redirect of a moved VM's old address.
type redirect struct {
	old   netip.Addr
	token uint64
	mac   net.HardwareAddr // the VM's
	on    bool
	dev   string // the uplink it was announced on while on
}

func host32(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: net.IP(ip4(a)), Mask: net.CIDRMask(32, 32)}
}

// SetRedirect installs the redirect of old (the moved VM's address, MAC
// mac) into the migration's tunnel, on or off. On: old/32 is routed into
// the TUN, this host answers ARP for old on its uplink (a proxy neighbour
// entry; forwarding and proxy_delay 0 held there) and announces it with a
// gratuitous ARP, so the LAN's router sends old's packets here. Off (and
// installed off): none of that; switching off announces old at the VM's
// MAC again (the VM runs here again after an undo).
func (p *Path) SetRedirect(old netip.Addr, token uint64, mac net.HardwareAddr, on bool) error {
	if !old.Is4() {
		return fmt.Errorf("wgpath: redirect %s: IPv4 only", old)
	}
	if len(mac) != 6 {
		return fmt.Errorf("wgpath: redirect %s: want the VM's 6-byte MAC", old)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.redirects[old]
	if r == nil {
		r = &redirect{old: old, token: token, mac: mac}
		p.redirects[old] = r
	}
	if r.on && (!on || r.token != token) {
		if err := p.redirectOff(r); err != nil {
			return err
		}
	}
	r.token, r.mac = token, mac
	if on && !r.on {
		return p.redirectOn(r)
	}
	return nil
}

func (p *Path) redirectOn(r *redirect) error {
	t := p.tunnels[r.token]
	if t == nil {
		return fmt.Errorf("wgpath: redirect %s: no tunnel %s", r.old, TunnelName(r.token))
	}
	h, err := p.handle()
	if err != nil {
		return err
	}
	defer h.Close()
	up, err := p.uplink(h)
	if err != nil {
		return err
	}
	dev := up.Attrs().Name
	if err := h.RouteReplace(&netlink.Route{Dst: host32(r.old), LinkIndex: t.index, Scope: netlink.SCOPE_LINK, Protocol: RouteProtocol}); err != nil {
		return fmt.Errorf("wgpath: route %s into %s: %w", r.old, t.name, err)
	}
	r.on, r.dev = true, dev
	for _, s := range []struct{ path, v string }{
		{"net/ipv4/conf/" + dev + "/forwarding", "1"},
		{"net/ipv4/neigh/" + dev + "/proxy_delay", "0"},
	} {
		if err := p.hold(s.path, s.v); err != nil {
			p.redirectOff(r)
			return fmt.Errorf("wgpath: redirect %s: %w", r.old, err)
		}
	}
	if err := h.NeighSet(&netlink.Neigh{LinkIndex: up.Attrs().Index, Family: netlink.FAMILY_V4, Flags: netlink.NTF_PROXY,
		IP: net.IP(ip4(r.old))}); err != nil {
		p.redirectOff(r)
		return fmt.Errorf("wgpath: answer ARP for %s on %s: %w", r.old, dev, err)
	}
	if err := p.garp(dev, r.old, up.Attrs().HardwareAddr); err != nil {
		p.opts.Log.Warn("userspace continuity: gratuitous ARP", "addr", r.old, "dev", dev, "err", err)
	}
	return nil
}

// redirectOff undoes redirectOn (whatever of it was done).
func (p *Path) redirectOff(r *redirect) error {
	if !r.on {
		return nil
	}
	h, err := p.handle()
	if err != nil {
		return err
	}
	defer h.Close()
	var errs []error
	if err := h.RouteDel(&netlink.Route{Dst: host32(r.old), Scope: netlink.SCOPE_LINK}); err != nil && !isNotFound(err) {
		errs = append(errs, fmt.Errorf("route %s: %w", r.old, err))
	}
	if l, err := h.LinkByName(r.dev); err == nil {
		if err := h.NeighDel(&netlink.Neigh{LinkIndex: l.Attrs().Index, Family: netlink.FAMILY_V4, Flags: netlink.NTF_PROXY,
			IP: net.IP(ip4(r.old))}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("proxy neighbour %s: %w", r.old, err))
		}
		// The VM's MAC owns the address again (the VM runs here after
		// an undo; after a drain no one here answers, as with eBPF).
		if err := p.garp(r.dev, r.old, r.mac); err != nil {
			p.opts.Log.Warn("userspace continuity: gratuitous ARP", "addr", r.old, "dev", r.dev, "err", err)
		}
	}
	errs = append(errs, p.release("net/ipv4/conf/"+r.dev+"/forwarding"), p.release("net/ipv4/neigh/"+r.dev+"/proxy_delay"))
	r.on = false
	return errors.Join(errs...)
}

// RemoveRedirect removes old's redirect (off first if on).
func (p *Path) RemoveRedirect(old netip.Addr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.redirects[old]
	if r == nil {
		return nil
	}
	delete(p.redirects, old)
	return p.redirectOff(r)
}

// RedirectStats are the counters of old's redirect (its tunnel's: see
// Counters), how long ago a packet last went into the tunnel, and
// whether any did.
func (p *Path) RedirectStats(old netip.Addr) (Counters, time.Duration, bool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.redirects[old]
	if r == nil {
		return nil, 0, false, fmt.Errorf("wgpath: no redirect for %s", old)
	}
	t := p.tunnels[r.token]
	if t == nil {
		return Counters{}, 0, false, nil
	}
	last := t.tun.last.Load()
	if last == 0 {
		return t.tun.counters(), 0, false, nil
	}
	return t.tun.counters(), time.Since(time.Unix(0, int64(last))), true, nil
}

func isNotFound(err error) bool {
	return errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV)
}
