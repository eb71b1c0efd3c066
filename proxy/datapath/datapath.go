// Package datapath loads vmhop's BPF datapath (bpf/datapath.c), attaches it
// to interfaces with TCX (or a clsact qdisc and a tc filter where TCX is
// missing), and manages its maps: which old addresses are redirected to
// which peer, which VMs this host delivers to, and the counters.
//
// Maps and links are pinned under Options.PinDir, so forwarding goes on
// while the daemon restarts; Detach removes everything.
package datapath

import (
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
// callers fall back to the userspace proxy.
var ErrUnsupported = errors.New("datapath: eBPF not available")

func be32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:]) // the bytes as they sit in the packet
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
	if err := spec.Variables[bpf.DatapathVarLocalIp].Set(be32(opts.LocalIP)); err != nil {
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
	if h == Uplink {
		if err := d.setEgressPort(ifi); err != nil {
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

// setEgressPort: if the uplink is a port of a bridge, packets the FIB
// routes out of the bridge leave by the port itself (see egress_ports in
// bpf/maps.h: a bridge segments tunnelled GSO packets in software).
func (d *Datapath) setEgressPort(ifi *net.Interface) error {
	l, err := netlink.LinkByIndex(ifi.Index)
	if err != nil {
		return fmt.Errorf("datapath: attach uplink to %s: %w", ifi.Name, err)
	}
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

// SetPeer accepts (or stops accepting) tunnel packets from peer.
func (d *Datapath) SetPeer(peer netip.Addr, accept bool) error {
	k := be32(peer)
	if accept {
		return d.objs.Peers.Put(k, uint32(1))
	}
	return ignoreNotExist(d.objs.Peers.Delete(k))
}

// SetRedirect points oldIP at peer. on=false installs the entry switched
// off; switching it on later is one map write, which is atomic. Once on,
// this host answers ARP for oldIP with mac (the VM's: neighbours' caches
// need no change).
func (d *Datapath) SetRedirect(oldIP, peer netip.Addr, mac net.HardwareAddr, on bool) error {
	mode := uint32(0)
	if on {
		mode = 1
	}
	if err := d.ensureStats(oldIP); err != nil {
		return err
	}
	r := bpf.DatapathRedirect{Peer: be32(peer), Mode: mode}
	copy(r.Mac[:], mac)
	return d.objs.Redirects.Put(be32(oldIP), r)
}

// RemoveRedirect stops redirecting oldIP.
func (d *Datapath) RemoveRedirect(oldIP netip.Addr) error {
	return ignoreNotExist(d.objs.Redirects.Delete(be32(oldIP)))
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
}

// SetVM installs or updates v, and the NAT entry for its new address.
func (d *Datapath) SetVM(v VM) error {
	if len(v.MAC) != 6 || len(v.GatewayMAC) != 6 {
		return fmt.Errorf("datapath: vm %s: MACs must be 6 bytes", v.OldIP)
	}
	val := bpf.DatapathVm{GwIp: be32(v.Gateway), Ifindex: uint32(v.Tap)}
	if v.NewIP.IsValid() {
		val.NewIp = be32(v.NewIP)
	}
	if v.Peer.IsValid() {
		val.Peer = be32(v.Peer)
	}
	copy(val.VmMac[:], v.MAC)
	copy(val.GwMac[:], v.GatewayMAC)
	if err := d.ensureStats(v.OldIP); err != nil {
		return err
	}
	if err := d.objs.Vms.Put(be32(v.OldIP), val); err != nil {
		return fmt.Errorf("datapath: vm %s: %w", v.OldIP, err)
	}
	if v.NewIP.IsValid() {
		return d.objs.Nat.Put(be32(v.NewIP), be32(v.OldIP))
	}
	return nil
}

// RemoveVM removes the VM and its NAT entry.
func (d *Datapath) RemoveVM(oldIP, newIP netip.Addr) error {
	err := ignoreNotExist(d.objs.Vms.Delete(be32(oldIP)))
	if newIP.IsValid() {
		err = errors.Join(err, ignoreNotExist(d.objs.Nat.Delete(be32(newIP))))
	}
	return err
}

func (d *Datapath) ensureStats(ip netip.Addr) error {
	n, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	zero := make([]bpf.DatapathCounters, n)
	err = d.objs.Stats.Update(be32(ip), zero, ebpf.UpdateNoExist)
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
}

// Counters are one address's counters summed over CPUs, by CounterNames.
type Counters map[string]uint64

// Stats returns the counters of old address ip.
func (d *Datapath) Stats(ip netip.Addr) (Counters, error) {
	var per []bpf.DatapathCounters
	if err := d.objs.Stats.Lookup(be32(ip), &per); err != nil {
		return nil, fmt.Errorf("datapath: stats of %s: %w", ip, err)
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
	var per []bpf.DatapathCounters
	if err := d.objs.Stats.Lookup(be32(oldIP), &per); err != nil {
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
