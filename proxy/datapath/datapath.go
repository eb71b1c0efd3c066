// Package datapath loads vmhop's BPF datapath (bpf/datapath.c), attaches it
// to interfaces with TCX (or a clsact qdisc and a tc filter where TCX is
// missing), and manages its maps: which old addresses are redirected to
// which peer, which VMs this host delivers to, and the counters.
//
// Maps and links are pinned under Options.PinDir, so forwarding goes on
// while the daemon restarts; Detach removes everything.
package datapath

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/bpf"
)

// Options configure a datapath on one host.
type Options struct {
	// LocalIP is this host's tunnel endpoint: the outer source of what it
	// tunnels, and the outer destination it accepts tunnel packets at.
	LocalIP netip.Addr
	// PinDir pins maps and links (e.g. /sys/fs/bpf/vmhop); empty: no pinning,
	// everything goes when the process exits.
	PinDir string
	// Legacy attaches with a clsact qdisc and a direct-action tc filter
	// instead of TCX (kernels before 6.6). Load falls back to it by itself
	// when TCX is not supported.
	Legacy bool
}

// Datapath is the loaded programs and maps.
type Datapath struct {
	opts Options
	objs bpf.DatapathObjects
	// attached: interface name -> what detaches it
	attached map[string]func() error
}

// ErrUnsupported means BPF cannot be used here (no CAP_BPF, old kernel):
// callers fall back to the userspace packet path (proxy/wgpath).
var ErrUnsupported = errors.New("datapath: eBPF not available")

// be32 is a as the programs hold it: the bytes as they sit in the packet.
// Anything but IPv4 is an error (never a panic): a VM's IPv6 side has calls
// of its own (SetRedirect6, VM.OldIP6), and the tunnel between hosts is
// IPv4.
func be32(a netip.Addr) (uint32, error) {
	if !a.Is4() {
		return 0, fmt.Errorf("address %q: want IPv4 here (a VM's IPv6 side goes through SetRedirect6 and VM.OldIP6; hosts are IPv4)", a)
	}
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:]), nil
}

// in6 is an IPv6 address as the programs hold it (struct in6: the 16
// bytes as they sit in the packet). Anything but IPv6 is an error.
func in6(a netip.Addr) (bpf.DatapathIn6, error) {
	var o bpf.DatapathIn6
	if !a.Is6() || a.Is4In6() {
		return o, fmt.Errorf("address %q: want IPv6", a)
	}
	b := a.As16()
	for i := range o.A {
		o.A[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return o, nil
}

// Load loads the programs and maps (reusing pinned maps from an earlier run).
func Load(opts Options) (*Datapath, error) {
	if !opts.LocalIP.Is4() {
		return nil, fmt.Errorf("datapath: local address %q: want IPv4 (IPv6 is not implemented yet)", opts.LocalIP)
	}
	spec, err := bpf.LoadDatapath()
	if err != nil {
		return nil, fmt.Errorf("datapath: %w", err)
	}
	local, _ := be32(opts.LocalIP)
	if err := spec.Variables[bpf.DatapathVarLocalIp].Set(local); err != nil {
		return nil, fmt.Errorf("datapath: set local_ip: %w", err)
	}
	var copts ebpf.CollectionOptions
	if opts.PinDir != "" {
		if err := checkBPFFS(filepath.Dir(opts.PinDir)); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(opts.PinDir, 0o700); err != nil {
			return nil, fmt.Errorf("datapath: pin dir: %w", err)
		}
		copts.Maps.PinPath = opts.PinDir
	} else {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
	}
	d := &Datapath{opts: opts, attached: map[string]func() error{}}
	if err := spec.LoadAndAssign(&d.objs, &copts); err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, ebpf.ErrNotSupported) {
			return nil, fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("datapath: verifier: %+v", ve)
		}
		return nil, fmt.Errorf("datapath: load: %w", err)
	}
	if err := d.ensureStats(0); err != nil { // host-wide counters
		d.objs.Close()
		return nil, fmt.Errorf("datapath: host counters: %w", err)
	}
	return d, nil
}

// checkBPFFS fails clearly when dir (or the nearest existing parent) is not
// on a bpf filesystem: pins elsewhere fail with a bare EPERM.
func checkBPFFS(dir string) error {
	for d := dir; ; d = filepath.Dir(d) {
		var st unix.Statfs_t
		if err := unix.Statfs(d, &st); err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("datapath: pin dir %s is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)", dir)
			}
			return nil
		}
		if d == "/" || d == "." {
			return fmt.Errorf("datapath: pin dir %s: no such directory", dir)
		}
	}
}

// Hook selects a program.
type Hook int

const (
	// Uplink is the WAN-facing interface of every host.
	Uplink Hook = iota
	// VMTap is a moved VM's tap on the new host.
	VMTap
)

func (h Hook) String() string { return [...]string{"uplink", "vm"}[h] }

// Attach attaches the hook's program to ifname's ingress, in the calling
// thread's network namespace. Attaching again replaces the program (a
// restarted daemon takes over its pinned link).
func (d *Datapath) Attach(h Hook, ifname string) error {
	prog := d.objs.UplinkIngress
	if h == VMTap {
		prog = d.objs.VmIngress
	}
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return fmt.Errorf("datapath: attach %s: lookup interface %q: %w", h, ifname, err)
	}
	l, err := netlink.LinkByIndex(ifi.Index)
	if err != nil {
		return fmt.Errorf("datapath: attach %s to %q: %w", h, ifname, err)
	}
	if err := checkNoBigTCP(l); err != nil {
		return fmt.Errorf("datapath: attach %s: %w", h, err)
	}
	if h == Uplink {
		if err := d.setEgressPort(ifi, l); err != nil {
			return err
		}
	}
	if !d.opts.Legacy {
		err := d.attachTCX(h, ifi, prog)
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
		d.opts.Legacy = true // kernel before 6.6: no TCX
	}
	return d.attachTC(h, ifi, prog)
}

// maxIPv4Packet is the largest IPv4 packet the programs parse: tot_len is
// 16 bits. BIG TCP (GRO building larger packets, tot_len 0) would pass
// them by untunnelled and untranslated.
const maxIPv4Packet = 65536

// checkNoBigTCP refuses a device whose GRO builds IPv4 packets over 64 KiB
// (BIG TCP, Linux 6.3+: gro_ipv4_max_size): they arrive at the TC hook with
// tot_len 0. The error names the device and the setting to change.
func checkNoBigTCP(l netlink.Link) error {
	a := l.Attrs()
	if a.GROIPv4MaxSize > maxIPv4Packet {
		return fmt.Errorf("device %q has BIG TCP on (gro_ipv4_max_size %d > %d): the datapath cannot tunnel or translate IPv4 packets over 64 KiB; set it to %d (ip link set dev %s gro_ipv4_max_size %d)",
			a.Name, a.GROIPv4MaxSize, maxIPv4Packet, maxIPv4Packet, a.Name, maxIPv4Packet)
	}
	return nil
}

// setEgressPort: if the uplink is a port of a bridge, packets the FIB
// routes out of the bridge leave by the port itself (see egress_ports in
// bpf/maps.h: a bridge segments tunnelled GSO packets in software).
func (d *Datapath) setEgressPort(ifi *net.Interface, l netlink.Link) error {
	master := uint32(l.Attrs().MasterIndex)
	if master == 0 {
		return nil
	}
	if m, err := netlink.LinkByIndex(int(master)); err != nil || m.Type() != "bridge" {
		return nil
	}
	if err := d.objs.EgressPorts.Put(master, uint32(ifi.Index)); err != nil {
		return fmt.Errorf("datapath: egress port %s: %w", ifi.Name, err)
	}
	return nil
}

func (d *Datapath) linkPin(h Hook, ifi *net.Interface) string {
	if d.opts.PinDir == "" {
		return ""
	}
	return filepath.Join(d.opts.PinDir, fmt.Sprintf("link-%s-%d", h, ifi.Index))
}

func (d *Datapath) attachTCX(h Hook, ifi *net.Interface, prog *ebpf.Program) error {
	pin := d.linkPin(h, ifi)
	if pin != "" {
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			if err := l.Update(prog); err != nil {
				l.Close()
				return fmt.Errorf("datapath: replace program on %s: %w", ifi.Name, err)
			}
			d.attached[ifi.Name] = func() error { defer l.Close(); return l.Unpin() }
			return nil
		}
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifi.Index, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return fmt.Errorf("datapath: attach %s to %s with TCX: %w", h, ifi.Name, err)
	}
	if pin != "" {
		if err := l.Pin(pin); err != nil {
			l.Close()
			return fmt.Errorf("datapath: pin link: %w", err)
		}
	}
	d.attached[ifi.Name] = func() error {
		defer l.Close()
		if pin != "" {
			return l.Unpin()
		}
		return nil
	}
	return nil
}

func (d *Datapath) attachTC(h Hook, ifi *net.Interface, prog *ebpf.Program) error {
	nl, err := netlink.LinkByIndex(ifi.Index)
	if err != nil {
		return err
	}
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifi.Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscReplace(qdisc); err != nil {
		return fmt.Errorf("datapath: clsact qdisc on %s: %w", ifi.Name, err)
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{LinkIndex: nl.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS,
			Handle: 1, Protocol: unix.ETH_P_ALL, Priority: 1},
		Fd: prog.FD(), Name: "vmhop-" + h.String(), DirectAction: true,
	}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("datapath: tc filter on %s: %w", ifi.Name, err)
	}
	d.attached[ifi.Name] = func() error { return netlink.FilterDel(f) }
	return nil
}

// Detach removes the program from ifname (in the calling thread's namespace).
func (d *Datapath) Detach(ifname string) error {
	f, ok := d.attached[ifname]
	if !ok {
		return nil
	}
	delete(d.attached, ifname)
	return f()
}

// Close releases this process's handles. Pinned maps and links stay: the
// datapath keeps forwarding until Remove.
func (d *Datapath) Close() error { return d.objs.Close() }

// Remove detaches every program this Datapath attached, closes it, and
// deletes its pin directory: pinned maps, and pinned links (an earlier
// daemon's too; a TCX link whose last pin and handle go is detached).
func (d *Datapath) Remove() error {
	var errs []error
	for name := range d.attached {
		errs = append(errs, d.Detach(name))
	}
	errs = append(errs, d.objs.Close())
	if d.opts.PinDir != "" {
		errs = append(errs, os.RemoveAll(d.opts.PinDir))
	}
	return errors.Join(errs...)
}

// Tunnel is one migration's tunnel between two hosts. Tunnel packets are
// UDP to port 6080 (bpf/consts.h: TUNNEL_PORT) carrying Token in front of
// the inner packet; a host accepts them only from a peer with the token of
// one of its migrations with that peer, so a packet forged with the peer's
// address alone is dropped (and counted: HostStats, "drop_spoofed").
type Tunnel struct {
	Peer  netip.Addr // the other host's tunnel endpoint (IPv4)
	Token uint64     // the migration's secret, the same on both hosts (NewToken); never 0
}

// NewToken returns a random, non-zero tunnel token for one migration.
func NewToken() (uint64, error) {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, fmt.Errorf("datapath: tunnel token: %w", err)
		}
		if t := binary.NativeEndian.Uint64(b[:]); t != 0 {
			return t, nil
		}
	}
}

// SetPeer accepts tunnel packets from t.Peer carrying t.Token (accept), or
// stops (a migration drained). While any token of the peer's is accepted,
// packets from its address with another token are dropped and counted
// as spoofed; after its last one, the address is forgotten.
func (d *Datapath) SetPeer(t Tunnel, accept bool) error {
	addr, err := be32(t.Peer)
	if err != nil {
		return fmt.Errorf("datapath: peer: %w", err)
	}
	if t.Token == 0 {
		return fmt.Errorf("datapath: peer %s: token 0 (use NewToken)", t.Peer)
	}
	k := bpf.DatapathPeerKey{Addr: addr, Token: t.Token}
	marker := bpf.DatapathPeerKey{Addr: addr}
	if accept {
		if err := d.objs.Peers.Put(marker, uint32(0)); err != nil {
			return fmt.Errorf("datapath: peer %s: %w", t.Peer, err)
		}
		return d.objs.Peers.Put(k, uint32(1))
	}
	if err := ignoreNotExist(d.objs.Peers.Delete(k)); err != nil {
		return fmt.Errorf("datapath: remove peer %s: %w", t.Peer, err)
	}
	var it bpf.DatapathPeerKey
	var v uint32
	entries := d.objs.Peers.Iterate()
	for entries.Next(&it, &v) {
		if it.Addr == addr && it.Token != 0 {
			return nil // another migration with this peer goes on
		}
	}
	if err := entries.Err(); err != nil {
		return fmt.Errorf("datapath: remove peer %s: %w", t.Peer, err)
	}
	return ignoreNotExist(d.objs.Peers.Delete(marker))
}

// SetRedirect points oldIP at t's peer, tunnelling with t's token. on=false
// installs the entry switched off; switching it on later is one map write,
// which is atomic. Once on, this host answers ARP for oldIP with mac (the
// VM's: neighbours' caches need no change).
func (d *Datapath) SetRedirect(oldIP netip.Addr, t Tunnel, mac net.HardwareAddr, on bool) error {
	mode := uint32(0)
	if on {
		mode = 1
	}
	old, err := be32(oldIP)
	if err != nil {
		return fmt.Errorf("datapath: redirect: %w", err)
	}
	peer, err := be32(t.Peer)
	if err != nil {
		return fmt.Errorf("datapath: redirect %s: peer: %w", oldIP, err)
	}
	if err := d.ensureStats(old); err != nil {
		return err
	}
	r := bpf.DatapathRedirect{Peer: peer, Mode: mode, Token: t.Token}
	copy(r.Mac[:], mac)
	return d.objs.Redirects.Put(old, r)
}

// SetRedirect6 is SetRedirect for a dual-stack VM's IPv6 side: packets
// for oldIP6 (any IPv6 packet: extension headers too) go through t's
// tunnel, which stays IPv4 between the hosts; once on, this host answers
// neighbour solicitations for oldIP6 with mac. Its counters and drain
// signal are those of the VM's IPv4 address countAs (Stats, Idle), so one
// drain covers both families.
func (d *Datapath) SetRedirect6(oldIP6, countAs netip.Addr, t Tunnel, mac net.HardwareAddr, on bool) error {
	old, err := in6(oldIP6)
	if err != nil {
		return fmt.Errorf("datapath: redirect: %w", err)
	}
	key, err := be32(countAs)
	if err != nil {
		return fmt.Errorf("datapath: redirect %s: counted as: %w", oldIP6, err)
	}
	peer, err := be32(t.Peer)
	if err != nil {
		return fmt.Errorf("datapath: redirect %s: peer: %w", oldIP6, err)
	}
	if err := d.ensureStats(key); err != nil {
		return err
	}
	r := bpf.DatapathRedirect6{Peer: peer, Token: t.Token, StatsKey: key}
	if on {
		r.Mode = 1
	}
	copy(r.Mac[:], mac)
	return d.objs.Redirects6.Put(old, r)
}

// RemoveRedirect stops redirecting oldIP (IPv4, or a VM's IPv6 side).
func (d *Datapath) RemoveRedirect(oldIP netip.Addr) error {
	if oldIP.Is6() && !oldIP.Is4In6() {
		old, err := in6(oldIP)
		if err != nil {
			return err
		}
		return ignoreNotExist(d.objs.Redirects6.Delete(old))
	}
	old, err := be32(oldIP)
	if err != nil {
		return fmt.Errorf("datapath: remove redirect: %w", err)
	}
	return ignoreNotExist(d.objs.Redirects.Delete(old))
}

// VM is a moved VM this host delivers to.
type VM struct {
	OldIP      netip.Addr       // the guest's address, unchanged
	NewIP      netip.Addr       // clients reach it here; invalid: no NAT
	Gateway    netip.Addr       // the guest's default gateway, answered for on the tap
	GatewayMAC net.HardwareAddr // MAC used for the gateway (the old gateway's keeps the guest's ARP cache right)
	MAC        net.HardwareAddr // the guest's MAC
	Tap        int              // ifindex of the VM's tap
	Peer       netip.Addr       // the old host; invalid: no tunnel back
	Token      uint64           // the migration's tunnel token (Tunnel), for packets back to Peer
	// A dual-stack VM's IPv6 side (OldIP6 invalid: none): its address,
	// kept by the guest; where clients reach it here (NAT66; invalid: no
	// NAT); its IPv6 gateway (link-local or global), whose neighbour
	// solicitations this host answers on the tap with GatewayMAC. Its
	// counters are OldIP's.
	OldIP6, NewIP6, Gateway6 netip.Addr
}

// SetVM installs or updates v, and the NAT entry for its new address.
func (d *Datapath) SetVM(v VM) error {
	if len(v.MAC) != 6 || len(v.GatewayMAC) != 6 {
		return fmt.Errorf("datapath: vm %s: MACs must be 6 bytes", v.OldIP)
	}
	old, err := be32(v.OldIP)
	if err != nil {
		return fmt.Errorf("datapath: vm: old address: %w", err)
	}
	gw, err := be32(v.Gateway)
	if err != nil {
		return fmt.Errorf("datapath: vm %s: gateway: %w", v.OldIP, err)
	}
	val := bpf.DatapathVm{GwIp: gw, Ifindex: uint32(v.Tap), Token: v.Token}
	if v.NewIP.IsValid() {
		if val.NewIp, err = be32(v.NewIP); err != nil {
			return fmt.Errorf("datapath: vm %s: new address: %w", v.OldIP, err)
		}
	}
	if v.Peer.IsValid() {
		if val.Peer, err = be32(v.Peer); err != nil {
			return fmt.Errorf("datapath: vm %s: peer: %w", v.OldIP, err)
		}
		if v.Token == 0 {
			return fmt.Errorf("datapath: vm %s: peer %s without a tunnel token", v.OldIP, v.Peer)
		}
	}
	copy(val.VmMac[:], v.MAC)
	copy(val.GwMac[:], v.GatewayMAC)
	old6, val6, err := vm6(v, val, old) // checked before anything is written
	if err != nil {
		return err
	}
	if err := d.ensureStats(old); err != nil {
		return err
	}
	if err := d.objs.Vms.Put(old, val); err != nil {
		return fmt.Errorf("datapath: vm %s: %w", v.OldIP, err)
	}
	if v.NewIP.IsValid() {
		if err := d.objs.Nat.Put(val.NewIp, old); err != nil {
			return fmt.Errorf("datapath: vm %s: nat: %w", v.OldIP, err)
		}
	}
	if v.OldIP6.IsValid() {
		return d.setVM6(v, old6, val6)
	}
	return nil
}

// vm6 is v's IPv6 side as the programs hold it, counted as old.
func vm6(v VM, val bpf.DatapathVm, old uint32) (old6 bpf.DatapathIn6, val6 bpf.DatapathVm6, err error) {
	if !v.OldIP6.IsValid() {
		return old6, val6, nil
	}
	if old6, err = in6(v.OldIP6); err != nil {
		return old6, val6, fmt.Errorf("datapath: vm %s: old IPv6 address: %w", v.OldIP, err)
	}
	val6 = bpf.DatapathVm6{Peer: val.Peer, Ifindex: val.Ifindex, VmMac: val.VmMac, GwMac: val.GwMac, StatsKey: old, Token: val.Token}
	if val6.GwIp, err = in6(v.Gateway6); err != nil {
		return old6, val6, fmt.Errorf("datapath: vm %s: IPv6 gateway: %w", v.OldIP6, err)
	}
	if v.NewIP6.IsValid() {
		if val6.NewIp, err = in6(v.NewIP6); err != nil {
			return old6, val6, fmt.Errorf("datapath: vm %s: new IPv6 address: %w", v.OldIP6, err)
		}
	}
	return old6, val6, nil
}

// setVM6 installs v's IPv6 side (vms6, nat6, taps6).
func (d *Datapath) setVM6(v VM, old6 bpf.DatapathIn6, val6 bpf.DatapathVm6) error {
	if err := d.objs.Vms6.Put(old6, val6); err != nil {
		return fmt.Errorf("datapath: vm %s: %w", v.OldIP6, err)
	}
	if err := d.objs.Taps6.Put(uint32(v.Tap), old6); err != nil {
		return fmt.Errorf("datapath: vm %s: tap: %w", v.OldIP6, err)
	}
	if v.NewIP6.IsValid() {
		return d.objs.Nat6.Put(val6.NewIp, old6)
	}
	return nil
}

// RemoveVM removes the VM and its NAT entry; given a VM's IPv6 side
// (old and new IPv6 addresses), its IPv6 entries.
func (d *Datapath) RemoveVM(oldIP, newIP netip.Addr) error {
	if oldIP.Is6() && !oldIP.Is4In6() {
		return d.removeVM6(oldIP, newIP)
	}
	old, err := be32(oldIP)
	if err != nil {
		return fmt.Errorf("datapath: remove vm: %w", err)
	}
	var n uint32
	if newIP.IsValid() {
		if n, err = be32(newIP); err != nil {
			return fmt.Errorf("datapath: remove vm %s: new address: %w", oldIP, err)
		}
	}
	err = ignoreNotExist(d.objs.Vms.Delete(old))
	if newIP.IsValid() {
		err = errors.Join(err, ignoreNotExist(d.objs.Nat.Delete(n)))
	}
	return err
}

func (d *Datapath) removeVM6(oldIP6, newIP6 netip.Addr) error {
	old, err := in6(oldIP6)
	if err != nil {
		return fmt.Errorf("datapath: remove vm: %w", err)
	}
	var n bpf.DatapathIn6
	if newIP6.IsValid() {
		if n, err = in6(newIP6); err != nil {
			return fmt.Errorf("datapath: remove vm %s: new address: %w", oldIP6, err)
		}
	}
	err = ignoreNotExist(d.objs.Vms6.Delete(old))
	if newIP6.IsValid() {
		err = errors.Join(err, ignoreNotExist(d.objs.Nat6.Delete(n)))
	}
	var tap uint32
	var a bpf.DatapathIn6
	var taps []uint32
	it := d.objs.Taps6.Iterate()
	for it.Next(&tap, &a) {
		if a == old {
			taps = append(taps, tap)
		}
	}
	err = errors.Join(err, it.Err())
	for _, t := range taps {
		err = errors.Join(err, ignoreNotExist(d.objs.Taps6.Delete(t)))
	}
	return err
}

func (d *Datapath) ensureStats(ip uint32) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	zero := make([]bpf.DatapathCounters, n)
	err = d.objs.Stats.Update(ip, zero, ebpf.UpdateNoExist)
	if errors.Is(err, ebpf.ErrKeyExist) {
		return nil
	}
	return err
}

// Counter names, in the order of enum counter in bpf/consts.h.
var CounterNames = []string{
	"encap_packets", "encap_bytes", "decap_packets", "decap_bytes", "delivered_packets",
	"dnat_packets", "snat_packets", "tunnel_back_packets", "arp_replies", "icmp_too_big",
	"mss_clamped", "drop_no_route", "drop_unknown_vm", "drop_error", "drop_too_big",
	"nat_port_translated", "drop_tuple_clash", "fragmented", "drop_spoofed",
}

// Counters are one address's counters summed over CPUs, by CounterNames.
type Counters map[string]uint64

// Stats returns the counters of old address ip.
func (d *Datapath) Stats(ip netip.Addr) (Counters, error) {
	k, err := be32(ip)
	if err != nil {
		return nil, fmt.Errorf("datapath: stats: %w", err)
	}
	return d.stats(k)
}

// HostStats returns the counters that belong to no address: drop_spoofed.
func (d *Datapath) HostStats() (Counters, error) { return d.stats(0) }

func (d *Datapath) stats(k uint32) (Counters, error) {
	var per []bpf.DatapathCounters
	if err := d.objs.Stats.Lookup(k, &per); err != nil {
		return nil, fmt.Errorf("datapath: stats of %s: %w", netip.AddrFrom4([4]byte(binary.NativeEndian.AppendUint32(nil, k))), err)
	}
	c := Counters{}
	for _, p := range per {
		for i, v := range p.C {
			c[CounterNames[i]] += v
		}
	}
	return c, nil
}

// Totals returns the counters of every address in the stats map summed
// over addresses and CPUs, by CounterNames: the whole host's datapath
// activity (vmhopd's /metrics). An address's counters leave the map with
// its VM entry, so totals can go down.
func (d *Datapath) Totals() (Counters, error) {
	c := Counters{}
	for _, name := range CounterNames {
		c[name] = 0
	}
	var key uint32
	var per []bpf.DatapathCounters
	it := d.objs.Stats.Iterate()
	for it.Next(&key, &per) {
		for _, p := range per {
			for i, v := range p.C {
				c[CounterNames[i]] += v
			}
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("datapath: read stats: %w", err)
	}
	return c, nil
}

// Idle returns how long ago a packet for oldIP was last redirected (the
// drain signal), and false if none ever was.
func (d *Datapath) Idle(oldIP netip.Addr) (time.Duration, bool, error) {
	k, err := be32(oldIP)
	if err != nil {
		return 0, false, fmt.Errorf("datapath: idle: %w", err)
	}
	var per []bpf.DatapathCounters
	if err := d.objs.Stats.Lookup(k, &per); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, false, nil
		}
		return 0, false, err
	}
	var last uint64
	for _, p := range per {
		last = max(last, p.LastNs)
	}
	if last == 0 {
		return 0, false, nil
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, false, err
	}
	return time.Duration(uint64(ts.Nano()) - last), true, nil
}

func ignoreNotExist(err error) error {
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// Programs exposes the loaded programs (tests run them with BPF_PROG_TEST_RUN).
func (d *Datapath) Programs() (uplink, vm *ebpf.Program) {
	return d.objs.UplinkIngress, d.objs.VmIngress
}

// MoveFlows hands the flows of VM vmIP that host from saw before the switch
// (its redirect off: every client packet for the VM passed it) to host to,
// and forgets them at from. The new host's NAT then gives no new client
// flow a guest 4-tuple that the guest still holds: open, or in TIME_WAIT
// after closing at the old site. Ages are carried, not timestamps (each
// host has its own monotonic clock). Call it once the redirect is on, before
// clients learn the new address. Returns how many flows moved.
func MoveFlows(from, to *Datapath, vmIP netip.Addr) (int, error) {
	vm, err := be32(vmIP)
	if err != nil {
		return 0, fmt.Errorf("datapath: move flows: %w", err)
	}
	type aged struct {
		k   bpf.DatapathFlowKey
		f   bpf.DatapathFlow
		age uint64
	}
	now, err := monoNow()
	if err != nil {
		return 0, err
	}
	var moved []aged
	var k bpf.DatapathFlowKey
	var f bpf.DatapathFlow
	it := from.objs.Flows.Iterate()
	for it.Next(&k, &f) {
		if k.VmIp == vm && f.Nat == 0 && f.LastNs <= now {
			moved = append(moved, aged{k, f, now - f.LastNs})
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("datapath: move flows of %s: %w", vmIP, err)
	}
	if now, err = monoNow(); err != nil {
		return 0, err
	}
	n := 0
	for _, m := range moved {
		m.f.LastNs = now - min(m.age, now)
		err := to.objs.Flows.Update(m.k, m.f, ebpf.UpdateNoExist) // what the new host saw itself wins
		if err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
			return n, fmt.Errorf("datapath: move flows of %s: %w", vmIP, err)
		}
		n++
		if err := ignoreNotExist(from.objs.Flows.Delete(m.k)); err != nil {
			return n, fmt.Errorf("datapath: move flows of %s: %w", vmIP, err)
		}
	}
	return n, nil
}

// monoNow is CLOCK_MONOTONIC in nanoseconds: bpf_ktime_get_ns's clock.
func monoNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("datapath: clock: %w", err)
	}
	return uint64(ts.Nano()), nil
}
