package migrator

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"
)

// Preflight is what Check found before a migration starts.
type Preflight struct {
	// DNSWait is how long dns-prepare will wait after lowering the TTL:
	// the record's TTL now, in full (0 without DNS).
	DNSWait time.Duration
	// DNSCachedFor is how long after the flip resolvers may still hold the
	// old address, so how long Drain keeps the redirect at least: the low
	// TTL Plan.TTL, or the current TTL if it is lower already.
	DNSCachedFor time.Duration
}

// Check refuses a plan whose addresses cannot all be right on the hosts as
// they are, before anything is changed:
//
//   - old_ip, new_ip and the VM's gateway must not be addresses of host A or
//     host B (with new_ip on host B, its NAT would send the host's own SSH
//     into the VM); each host must hold its WAN address (Plan.SourceWAN,
//     Plan.DestWAN), each host saying what it holds (AddressHolder);
//   - the DNS name must hold exactly the VM's old addresses (OldAddrs: A,
//     and AAAA for a dual-stack VM), or its new ones (a flip already
//     done): otherwise the flip, after the commit point, would fail.
//
// It says how long the DNS steps will take (Preflight). Config validation
// (internal/config) checks the same addresses against each other; this
// checks them against every address the hosts' interfaces hold.
func Check(ctx context.Context, p *Plan) (Preflight, error) {
	var pf Preflight
	for _, h := range []struct {
		host AddressHolder
		wan  netip.Addr
	}{{p.Source, p.SourceWAN}, {p.Dest, p.DestWAN}} {
		held, err := h.host.HeldAddrs(ctx, AddrQuery{})
		if err != nil {
			return pf, fmt.Errorf("preflight: addresses of %s: %w", held.Name, err)
		}
		for _, vm := range []struct {
			name string
			a    netip.Addr
		}{{"old_ip", p.OldIP}, {"new_ip", p.NewIP}, {"gateway", p.Gateway},
			{"old_ip6", p.OldIP6}, {"new_ip6", p.NewIP6}, {"gateway6", p.Gateway6}} {
			if vm.a.IsValid() && slices.Contains(held.Addrs, vm.a) {
				return pf, fmt.Errorf("preflight: %s %s is an address of %s itself: traffic for the host would go to the VM", vm.name, vm.a, held.Name)
			}
		}
		if !slices.Contains(held.Addrs, h.wan) {
			return pf, fmt.Errorf("preflight: %s does not hold its WAN address %s (it holds %v)", held.Name, h.wan, held.Addrs)
		}
	}
	if p.DNS == nil {
		return pf, nil
	}
	s, err := p.DNS.Show(ctx, p.Zone, p.DNSName)
	if err != nil {
		return pf, fmt.Errorf("preflight: dns: %w", err)
	}
	if addrs := s.Addrs(); !sameAddrs(addrs, p.OldAddrs()) && !sameAddrs(addrs, p.NewAddrs()) {
		return pf, fmt.Errorf("preflight: dns: %s holds %v, not the VM's old addresses %v (A and AAAA): the flip after the move would fail", p.DNSName, addrs, p.OldAddrs())
	}
	pf.DNSWait = time.Duration(s.MaxTTL()) * time.Second
	pf.DNSCachedFor = time.Duration(min(s.MaxTTL(), p.TTL)) * time.Second
	return pf, nil
}

// sameAddrs reports whether a and b hold the same addresses, in any order.
func sameAddrs(a, b []netip.Addr) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, netip.Addr.Compare)
	slices.SortFunc(b, netip.Addr.Compare)
	return slices.Equal(a, b)
}

// AddressHolder says which addresses a host's interfaces hold (both
// SourceHost and Destination are one).
type AddressHolder interface {
	HeldAddrs(ctx context.Context, req AddrQuery) (HeldAddrs, error)
}

// AddrQuery asks a host for its addresses.
type AddrQuery struct {
	// ImageDir, if set, is where the migration would create its image on
	// this host: HeldAddrs.FreeBytes says the free space there.
	ImageDir string `json:"image_dir,omitempty"`
}

// HeldAddrs is a host's name and every address of its namespace's
// interfaces, with what else the preflight asks each host: its
// continuity mechanism and the free space for the image.
type HeldAddrs struct {
	Name  string       `json:"name"`
	Addrs []netip.Addr `json:"addrs"`
	// Continuity is how the host carries a VM's old flows: "ebpf" (its
	// datapath is loaded), "userspace" (proxy/wgpath), "" neither loaded.
	Continuity string `json:"continuity,omitempty"`
	// FreeBytes is the free space at AddrQuery.ImageDir, in bytes (0: not
	// asked).
	FreeBytes int64 `json:"free_bytes,omitempty"`
}

// HeldAddrs implements AddressHolder: the addresses of every interface of
// the host's namespace.
func (h *Host) HeldAddrs(_ context.Context, q AddrQuery) (HeldAddrs, error) {
	out := HeldAddrs{Name: h.Name}
	switch {
	case h.Continuity == ContinuityUserspace:
		out.Continuity = ContinuityUserspace
	case h.dp != nil:
		out.Continuity = ContinuityEBPF
	}
	if q.ImageDir != "" {
		free, err := freeBytes(q.ImageDir)
		if err != nil {
			return out, fmt.Errorf("%s: free space of %s: %w", h.Name, q.ImageDir, err)
		}
		out.FreeBytes = free
	}
	err := h.do(func() error {
		as, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range as {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					out.Addrs = append(out.Addrs, ip.Unmap())
				}
			}
		}
		return nil
	})
	return out, err
}
