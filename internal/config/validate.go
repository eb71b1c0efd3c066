package config

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/units"
)

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	// ifNameRE is a Linux interface name (IFNAMSIZ-1 bytes, no / or space).
	ifNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$`)
	// hostRE is a host name as certificates carry it (RFC 1123 labels).
	hostRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$`)
)

// isHostLabelName reports whether s is a host name of RFC 1123 labels, at
// most 253 bytes, without a trailing dot: what a certificate's DNS SAN holds.
func isHostLabelName(s string) bool { return len(s) <= 253 && hostRE.MatchString(s) }

func (d *Daemon) validate(p string, errs *Errors) {
	tls := d.TLS.Cert != "" || d.TLS.Key != "" || d.TLS.CA != ""
	switch {
	case d.Name != "" && !isHostLabelName(d.Name):
		errs.add(p+".name", "%q is not a host name (letters, digits, - and dots)", d.Name)
	case d.Name == "" && tls:
		errs.add(p+".name", "required with tls: this host's name, a DNS name in tls.cert")
	}
	checkHostPort(p+".listen", d.Listen, errs)
	checkAbs(p+".socket", d.Socket, errs)
	if len(d.Peers) > 0 && !tls {
		errs.add(p+".peers", "need tls: the peer API is mutual TLS only")
	}
	seen := map[string]bool{d.Name: true}
	for i, peer := range d.Peers {
		k := fmt.Sprintf("%s.peers[%d]", p, i)
		switch {
		case !isHostLabelName(peer.Name):
			errs.add(k+".name", "%q is not a host name (letters, digits, - and dots)", peer.Name)
		case peer.Name == d.Name:
			errs.add(k+".name", "%q is this host's own name", peer.Name)
		case seen[peer.Name]:
			errs.add(k+".name", "%q is listed twice", peer.Name)
		}
		seen[peer.Name] = true
		checkHostPort(k+".address", peer.Address, errs)
	}
	checkAbs(p+".state_dir", d.StateDir, errs)
	if d.Uplink == "" {
		errs.add(p+".uplink", "required: the interface facing the WAN")
	} else if len(d.Uplink) > 15 || strings.ContainsAny(d.Uplink, "/ \t") {
		errs.add(p+".uplink", "%q is not an interface name", d.Uplink)
	}
	if !d.Address.IsValid() {
		errs.add(p+".address", "required: this host's WAN address")
	} else {
		checkIPv4Only(p+".address", d.Address, errs)
	}
	checkOneOf(p+".datapath", d.Datapath, errs, "auto", "ebpf", "userspace")
	checkAbs(p+".bpffs", d.BPFFS, errs)
	if tls {
		for _, f := range []struct{ key, path string }{{"cert", d.TLS.Cert}, {"key", d.TLS.Key}, {"ca", d.TLS.CA}} {
			if f.path == "" {
				errs.add(p+".tls."+f.key, "required with the other tls keys: set cert, key and ca together, or none of them")
			} else if !filepath.IsAbs(f.path) {
				errs.add(p+".tls."+f.key, "%q is not an absolute path", f.path)
			}
		}
	}
	checkOneOf(p+".log_level", d.LogLevel, errs, "debug", "info", "warn", "error")
	checkOneOf(p+".log_format", d.LogFormat, errs, "text", "json")
	if d.MetricsListen != "" {
		checkHostPort(p+".metrics_listen", d.MetricsListen, errs)
	}
	for _, l := range []struct{ key, hostport string }{{"listen", d.Listen}, {"metrics_listen", d.MetricsListen}} {
		if _, port, err := net.SplitHostPort(l.hostport); err == nil {
			if n, err := strconv.Atoi(port); err == nil && n > 0 && n < 65536 && d.MigrationPorts.Contains(uint16(n)) {
				errs.add(p+".migration_ports", "%s holds vmhopd.%s's port %d: migrations would collide with it", d.MigrationPorts, l.key, n)
			}
		}
	}
}

func (m *Migration) validate(p string, errs *Errors) {
	if !nameRE.MatchString(m.Name) {
		errs.add(p+".name", "%q is not a name (letters, digits, _ . -; at most 64)", m.Name)
	}

	vm := p + ".vm"
	checkOneOf(vm+".hypervisor", m.VM.Hypervisor, errs, "qemu", "virtualbox")
	switch m.VM.Hypervisor {
	case "qemu":
		checkAbs(vm+".qmp_socket", m.VM.QMPSocket, errs)
	case "virtualbox":
		if m.VM.Name == "" {
			errs.add(vm+".name", "required for virtualbox: the VM's name in VBoxManage")
		}
		if m.Storage.Mode != "chunked" {
			errs.add(p+".storage.mode", "%q needs QEMU; virtualbox disks use \"chunked\"", m.Storage.Mode)
		}
	}
	checkAbs(vm+".disk", m.VM.Disk, errs)

	for _, h := range []struct {
		key, daemon string
		addr        netip.Addr
	}{{p + ".source", m.Source.Daemon, m.Source.Address}, {p + ".destination", m.Destination.Daemon, m.Destination.Address}} {
		checkHostPort(h.key+".daemon", h.daemon, errs)
		if !h.addr.IsValid() {
			errs.add(h.key+".address", "required: the host's WAN address")
		} else {
			checkIPv4Only(h.key+".address", h.addr, errs)
		}
	}
	dst := p + ".destination"
	checkAbs(dst+".disk", m.Destination.Disk, errs)
	switch m.VM.Hypervisor {
	case "qemu":
		if !ifNameRE.MatchString(m.Destination.Tap) {
			errs.add(dst+".tap", "%q is not an interface name (required for qemu: the VM's tap on the destination host)", m.Destination.Tap)
		}
		if m.Destination.Bridge != "" && !ifNameRE.MatchString(m.Destination.Bridge) {
			errs.add(dst+".bridge", "%q is not an interface name", m.Destination.Bridge)
		}
		if m.Destination.QMPSocket != "" {
			checkAbs(dst+".qmp_socket", m.Destination.QMPSocket, errs)
		}
	case "virtualbox":
		for _, k := range []struct{ key, v string }{{"tap", m.Destination.Tap}, {"bridge", m.Destination.Bridge}, {"qmp_socket", m.Destination.QMPSocket}} {
			if k.v != "" {
				errs.add(dst+"."+k.key, "only for qemu: VirtualBox keeps the VM's own network settings")
			}
		}
	}
	if m.Source.Address.IsValid() && m.Source.Address == m.Destination.Address {
		errs.add(p+".destination.address", "%q is the source's address too", m.Destination.Address)
	}

	hc := p + ".health_check"
	if m.Health.HTTPPath != "" && !strings.HasPrefix(m.Health.HTTPPath, "/") {
		errs.add(hc+".http_path", "%q is not a URL path (starts with /)", m.Health.HTTPPath)
	}
	if m.Health.HTTPPort == 0 {
		errs.add(hc+".http_port", "0 is not a port")
	}
	if m.Health.Deadline <= 0 {
		errs.add(hc+".deadline", "%s: want a positive duration", m.Health.Deadline)
	}

	n := p + ".network"
	checkAddr(n+".old_ip", m.Network.OldIP, errs)
	checkAddr(n+".new_ip", m.Network.NewIP, errs)
	checkAddr(n+".gateway", m.Network.Gateway, errs)
	for _, a := range []struct {
		key  string
		addr netip.Addr
	}{{"old_ip", m.Network.OldIP}, {"new_ip", m.Network.NewIP}, {"gateway", m.Network.Gateway}} {
		if a.addr.IsValid() && !a.addr.Is4() {
			errs.add(n+"."+a.key, "%q is IPv6: %s is the VM's IPv4 side; put its IPv6 address in %s6 (a VM without IPv4 is not supported)", a.addr, a.key, a.key)
		}
	}
	if m.Network.OldIP.IsValid() && m.Network.NewIP.IsValid() && m.Network.OldIP == m.Network.NewIP {
		errs.add(n+".new_ip", "%q equals old_ip: nothing to move", m.Network.NewIP)
	}
	m.Network.checkIPv6(n, errs)
	m.checkAddresses(p, errs)
	checkPositive(n+".drain_timeout", m.Network.DrainTimeout, errs)
	if m.Network.DrainIdle <= 0 || m.Network.DrainIdle > m.Network.DrainTimeout {
		errs.add(n+".drain_idle", "%s must be above 0 and at most drain_timeout (%s)", m.Network.DrainIdle, m.Network.DrainTimeout)
	}

	d := p + ".dns"
	checkHostPort(d+".server", m.DNS.Server, errs)
	zoneOK := checkFQDN(d+".zone", m.DNS.Zone, errs)
	if checkFQDN(d+".name", m.DNS.Name, errs) && zoneOK && !dns.IsSubDomain(m.DNS.Zone, m.DNS.Name) {
		errs.add(d+".name", "%q is not inside zone %q", m.DNS.Name, m.DNS.Zone)
	}
	if m.DNS.TTL < 1 || m.DNS.TTL > 86400 {
		errs.add(d+".ttl", "%d is not from 1 to 86400 seconds", m.DNS.TTL)
	}
	if m.DNS.TSIGKeyFile == "" {
		errs.add(d+".tsig_key_file", "required: updates are always TSIG-signed")
	}
	checkPositive(d+".timeout", m.DNS.Timeout, errs)

	l := p + ".limits"
	if m.Limits.Bandwidth < units.Kbit {
		errs.add(l+".bandwidth", "%q is below 1kbit", m.Limits.Bandwidth)
	}
	if m.Limits.Downtime < time.Millisecond || m.Limits.Downtime > time.Hour {
		errs.add(l+".downtime", "%s is not from 1ms to 1h", m.Limits.Downtime)
	}
	checkPositive(l+".deadline", m.Limits.Deadline, errs)
	if m.Limits.MaxIterations < 1 {
		errs.add(l+".max_iterations", "%d is below 1", m.Limits.MaxIterations)
	}
	checkOneOf(l+".pacing", m.Limits.Pacing, errs, "off", "budget", "yield")
	if c := m.Limits.Congestion; c != "" && !congestionName.MatchString(c) {
		errs.add(l+".congestion", "%q is not a TCP congestion control name (e.g. bbr, cubic, reno; \"\" keeps the host's default)", c)
	}

	s := p + ".storage"
	checkOneOf(s+".mode", m.Storage.Mode, errs, "qemu", "chunked")
	if c := m.Storage.ChunkSize; c < 4*units.KiB || c > 64*units.MiB || c&(c-1) != 0 {
		errs.add(s+".chunk_size", "%q is not a power of two from 4KiB to 64MiB", c)
	}
	if m.Storage.FinalDelta == 0 {
		errs.add(s+".final_delta", "must be above 0")
	}
	if m.Storage.MaxRounds < 1 {
		errs.add(s+".max_rounds", "%d is below 1", m.Storage.MaxRounds)
	}
}

// checkAddresses refuses addresses that cannot all be right together: the
// VM's addresses are neither host's own (with new_ip = host B's address,
// host B's NAT would send its own SSH and vmhopd traffic into the VM), and
// the VM's gateway is not the VM. migrator.Preflight checks the same against
// every address the hosts actually hold.
func (m *Migration) checkAddresses(p string, errs *Errors) {
	n := m.Network
	hosts := []struct {
		key, who string
		a        netip.Addr
	}{{"source.address", "host A", m.Source.Address}, {"destination.address", "host B", m.Destination.Address}}
	for _, vm := range []struct {
		key string
		a   netip.Addr
	}{{"old_ip", n.OldIP}, {"new_ip", n.NewIP}} {
		for _, h := range hosts {
			if vm.a.IsValid() && vm.a == h.a {
				errs.add(p+".network."+vm.key, "%q is %s's own address (%s): the VM cannot take it over; traffic for the host would go to the VM", vm.a, h.who, h.key)
			}
		}
	}
	if g := n.Gateway; g.IsValid() {
		switch g {
		case n.OldIP:
			errs.add(p+".network.gateway", "%q equals old_ip: the VM cannot be its own gateway", g)
		case n.NewIP:
			errs.add(p+".network.gateway", "%q equals new_ip: the VM's gateway cannot be its new address", g)
		}
	}
}

func checkHostPort(key, s string, errs *Errors) {
	if s == "" {
		errs.add(key, "required: host:port")
		return
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		errs.add(key, "%q is not host:port", s)
		return
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		errs.add(key, "%q: port %q is not from 1 to 65535", s, port)
	}
	if host == "" {
		return // ":7710" listens on every address
	}
	if _, err := netip.ParseAddr(host); err != nil && !isHostName(host) {
		errs.add(key, "%q: %q is not an address or host name", s, host)
	}
}

func checkAbs(key, path string, errs *Errors) {
	if path == "" {
		errs.add(key, "required: an absolute path")
	} else if !filepath.IsAbs(path) {
		errs.add(key, "%q is not an absolute path", path)
	}
}

func checkAddr(key string, a netip.Addr, errs *Errors) {
	if !a.IsValid() {
		errs.add(key, "required: an IPv4 or IPv6 address")
	} else if a.IsUnspecified() || a.IsMulticast() || a.IsLoopback() {
		errs.add(key, "%q is not a unicast host address", a)
	}
}

// checkIPv4Only refuses an IPv6 address for a host: the tunnel between the
// hosts is IPv4 (it carries the VM's IPv6 packets inside), so a host is
// reached at an IPv4 address.
func checkIPv4Only(key string, a netip.Addr, errs *Errors) {
	if a.IsValid() && !a.Unmap().Is4() {
		errs.add(key, "%q is IPv6: the tunnel between the hosts is IPv4 (it carries the VM's IPv6 inside); give the host's IPv4 address", a)
	}
}

// checkIPv6 checks the dual-stack keys: all three or none, each of them
// IPv6, old_ip6 and new_ip6 global unicast addresses that differ, the
// gateway neither of them.
func (nw Network) checkIPv6(n string, errs *Errors) {
	set := nw.OldIP6.IsValid() || nw.NewIP6.IsValid() || nw.Gateway6.IsValid()
	if !set {
		return
	}
	for _, a := range []struct {
		key  string
		addr netip.Addr
		what string
	}{{"old_ip6", nw.OldIP6, "the VM's IPv6 address at the source site"},
		{"new_ip6", nw.NewIP6, "its IPv6 address at the destination site"},
		{"gateway6", nw.Gateway6, "its IPv6 default gateway at the source site"}} {
		k := n + "." + a.key
		switch {
		case !a.addr.IsValid():
			errs.add(k, "required with the other IPv6 keys (old_ip6, new_ip6, gateway6: all or none): %s", a.what)
		case a.addr.Is4():
			errs.add(k, "%q is IPv4: %s takes %s (the IPv4 side is %s)", a.addr, a.key, a.what, strings.TrimSuffix(a.key, "6"))
		case a.addr.IsUnspecified() || a.addr.IsMulticast() || a.addr.IsLoopback():
			errs.add(k, "%q is not a unicast host address", a.addr)
		case a.key != "gateway6" && a.addr.IsLinkLocalUnicast():
			errs.add(k, "%q is link-local: clients elsewhere cannot reach it; give a global address", a.addr)
		}
	}
	if nw.OldIP6.IsValid() && nw.OldIP6 == nw.NewIP6 {
		errs.add(n+".new_ip6", "%q equals old_ip6: nothing to move", nw.NewIP6)
	}
	if g := nw.Gateway6; g.IsValid() && (g == nw.OldIP6 || g == nw.NewIP6) {
		errs.add(n+".gateway6", "%q is the VM's own address: the VM cannot be its own gateway", g)
	}
}

// congestionName is what the kernel takes as a TCP congestion control
// name (TCP_CA_NAME_MAX is 16 with the NUL).
var congestionName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,14}$`)

func checkOneOf(key, v string, errs *Errors, allowed ...string) {
	for _, a := range allowed {
		if v == a {
			return
		}
	}
	errs.add(key, "%q is not one of %s", v, strings.Join(allowed, ", "))
}

func checkPositive(key string, d time.Duration, errs *Errors) {
	if d <= 0 {
		errs.add(key, "%s must be above 0", d)
	}
}

func checkFQDN(key, name string, errs *Errors) bool {
	if _, ok := dns.IsDomainName(name); !ok || !dns.IsFqdn(name) || name == "." {
		errs.add(key, "%q is not a fully qualified domain name (end it with a dot)", name)
		return false
	}
	return true
}

func isHostName(s string) bool {
	_, ok := dns.IsDomainName(s)
	return ok
}
