// Package wgpath is vmhop's network continuity where the eBPF datapath
// cannot load (no CAP_BPF, an old kernel) or is not wanted (`datapath:
// userspace`): the moved VM's packets are forwarded at the packet level,
// so TCP connections open across the move survive, as with eBPF. The WAN
// leg is WireGuard (wireguard-go, in this process, on a TUN device), one
// device and one key pair per migration on each host; everything else is
// the kernel's: routes, proxy ARP, policy routing and nftables NAT.
//
// On the source host (A), while the redirect is on: old_ip/32 is routed
// into the migration's TUN (WireGuard peer B, allowed IPs old_ip/32),
// host A answers ARP for old_ip on the interface holding its WAN address
// (a proxy neighbour entry, announced with a gratuitous ARP), and the VM's
// replies that come back out of the TUN are forwarded onto A's network
// from old_ip. On the destination host (B): old_ip/32 is routed to the
// VM's tap, whose host side takes the old gateway's MAC and answers ARP
// for the VM (proxy ARP); new_ip is answered for on B's LAN and NATed to
// old_ip (nftables DNAT; the VM's own new TCP connections leave SNATed to
// new_ip); every other packet from old_ip is marked and policy-routed into
// the migration's TUN back to A (WireGuard peer A, allowed IPs 0.0.0.0/0),
// like the eBPF datapath's tunnel-back default.
//
// Everything is named after the migration's tunnel or the VM's address
// and removed by the calls that undo it (SetRedirect off, RemoveRedirect,
// RemoveVM, CloseTunnel) or by Close; sysctls it changes on interfaces it
// does not own are restored when the last user releases them.
package wgpath

import (
	"bufio"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/vmhop/vmhop/internal/netns"
)

// Key is a Curve25519 key as WireGuard uses it (private or public).
type Key [32]byte

// NewKey returns a new private key (clamped, from crypto/rand).
func NewKey() (Key, error) {
	var k Key
	if _, err := rand.Read(k[:]); err != nil {
		return k, err
	}
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
	return k, nil
}

// Public is the public key of private key k.
func (k Key) Public() Key {
	var pub Key
	p, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err == nil {
		copy(pub[:], p)
	}
	return pub
}

// String is the key in base64, as wg(8) shows it.
func (k Key) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// IsZero says whether k is unset.
func (k Key) IsZero() bool { return k == Key{} }

// ParseKey reads a base64 key (Key.String).
func ParseKey(s string) (Key, error) {
	var k Key
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("wireguard key %q: want 32 bytes in base64", s)
	}
	copy(k[:], b)
	return k, nil
}

// Overhead is what WireGuard adds to an IPv4 packet: outer IPv4 and UDP
// headers, its data header and the AEAD tag (20+8+16+16 bytes); the TUN's
// MTU is the WAN interface's less this, rounded down as wg-quick does
// (80 leaves room for an IPv6 outer header).
const Overhead = 80

// Options configure a host's Path.
type Options struct {
	// Netns is the network namespace the host's interfaces live in; ""
	// is this process's.
	Netns string
	// LocalIP is the host's WAN address: the interface holding it is
	// where the host answers ARP for a moved VM's address (source) or
	// its new address (destination); the tunnel's MTU follows its MTU.
	LocalIP netip.Addr
	Log     *slog.Logger
}

// Path is one host's userspace continuity: its migrations' tunnels, the
// source's redirects and the destination's VM entries. Safe for
// concurrent use.
type Path struct {
	opts Options

	mu        sync.Mutex
	tunnels   map[uint64]*tunnel
	redirects map[netip.Addr]*redirect
	vms       map[netip.Addr]*vmEntry
	keep      keeper
}

// New returns a host's Path; nothing is created until a call needs it.
func New(opts Options) *Path {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	return &Path{opts: opts, tunnels: map[uint64]*tunnel{}, redirects: map[netip.Addr]*redirect{},
		vms: map[netip.Addr]*vmEntry{}, keep: keeper{refs: map[string]int{}, orig: map[string]string{}}}
}

// Check says whether this host can run the userspace path: /dev/net/tun
// opens (a TUN device can be made) and nftables answers, in netns ("":
// this process's).
func Check(ns string) error {
	if err := do(ns, func() error {
		f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("userspace continuity: %w", err)
		}
		f.Close()
		return nil
	}); err != nil {
		return err
	}
	return withNft(ns, func(c *nftables.Conn) error {
		if _, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4); err != nil {
			return fmt.Errorf("userspace continuity: nftables: %w", err)
		}
		return nil
	})
}

func do(ns string, fn func() error) error {
	if ns == "" {
		return fn()
	}
	return netns.Do(ns, fn)
}

func (p *Path) do(fn func() error) error { return do(p.opts.Netns, fn) }

// handle is a netlink handle in the host's namespace.
func (p *Path) handle() (*netlink.Handle, error) {
	if p.opts.Netns == "" {
		return netlink.NewHandle()
	}
	ns, err := netns.Handle(p.opts.Netns)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	return netlink.NewHandleAt(ns)
}

// withNft runs fn with an nftables connection in namespace ns ("": this
// process's).
func withNft(ns string, fn func(*nftables.Conn) error) error {
	var opts []nftables.ConnOption
	if ns != "" {
		h, err := vns.GetFromName(ns)
		if err != nil {
			return fmt.Errorf("nftables: open netns %q: %w", ns, err)
		}
		defer h.Close()
		opts = append(opts, nftables.WithNetNSFd(int(h)))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return fn(c)
}

func (p *Path) withNft(fn func(*nftables.Conn) error) error { return withNft(p.opts.Netns, fn) }

// uplink is the interface holding LocalIP.
func (p *Path) uplink(h *netlink.Handle) (netlink.Link, error) {
	addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == p.opts.LocalIP {
			return h.LinkByIndex(a.LinkIndex)
		}
	}
	return nil, fmt.Errorf("no interface holds the host's address %s", p.opts.LocalIP)
}

// Peer is the other host of a migration's tunnel.
type Peer struct {
	Key      Key            // its public key
	Endpoint netip.AddrPort // its WAN address and the tunnel's UDP port there; invalid: learnt from its handshake
	Allowed  []netip.Prefix // inner source addresses accepted from it, and routed to it
	// Keepalive makes this end send a keepalive at once (starting the
	// handshake) and then every interval when idle; 0: none.
	Keepalive time.Duration
}

// tunnel is one migration's WireGuard device on this host.
type tunnel struct {
	token uint64
	name  string
	index int
	mark  uint32 // packet mark, ct mark and routing table of this tunnel
	dev   *device.Device
	tun   *countTUN
	port  uint16
}

// TunnelName is the TUN device's name for a migration's token.
func TunnelName(token uint64) string { return fmt.Sprintf("vhwg%08x", uint32(token^token>>32)) }

// OpenTunnel makes the migration's WireGuard device (its own key pair,
// a UDP port the kernel picks on all addresses), up, without a peer:
// SetPeer adds it. It answers the device's public key and port. A token
// already open answers the same.
func (p *Path) OpenTunnel(token uint64) (Key, uint16, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if t := p.tunnels[token]; t != nil {
		return p.public(t)
	}
	if token == 0 {
		return Key{}, 0, errors.New("wgpath: open tunnel: token 0")
	}
	t, err := p.openTunnel(token)
	if err != nil {
		return Key{}, 0, fmt.Errorf("wgpath: open tunnel: %w", err)
	}
	p.tunnels[token] = t
	return p.public(t)
}

func (p *Path) public(t *tunnel) (Key, uint16, error) {
	priv, err := t.privateKey()
	return priv.Public(), t.port, err
}

func (t *tunnel) privateKey() (Key, error) {
	s, err := t.dev.IpcGet()
	if err != nil {
		return Key{}, err
	}
	for l := range strings.SplitSeq(s, "\n") {
		if v, ok := strings.CutPrefix(l, "private_key="); ok {
			var k Key
			b, err := hex.DecodeString(v)
			if err != nil || len(b) != 32 {
				return k, fmt.Errorf("private key from the device: %q", v)
			}
			copy(k[:], b)
			return k, nil
		}
	}
	return Key{}, errors.New("the device has no private key")
}

func (p *Path) openTunnel(token uint64) (*tunnel, error) {
	h, err := p.handle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	up, err := p.uplink(h)
	if err != nil {
		return nil, err
	}
	mtu := up.Attrs().MTU - Overhead
	t := &tunnel{token: token, name: TunnelName(token)}
	var td tun.Device
	if err := p.do(func() error {
		td, err = tun.CreateTUN(t.name, mtu)
		return err
	}); err != nil {
		return nil, fmt.Errorf("create TUN %s: %w", t.name, err)
	}
	t.tun = &countTUN{Device: td, mtu: mtu}
	fail := func(err error) (*tunnel, error) {
		if t.dev != nil {
			t.dev.Close()
		} else {
			td.Close()
		}
		return nil, err
	}
	// Quiet (no IPv6 link-local chatter into the tunnel), forwarding,
	// and loose reverse-path filtering: on host B the client packets it
	// carries have sources routed out of the uplink.
	if err := p.do(func() error {
		sysctlWrite("net/ipv6/conf/"+t.name+"/disable_ipv6", "1") // no IPv6 in the kernel: nothing to quiet
		for k, v := range map[string]string{"forwarding": "1", "rp_filter": "2"} {
			if err := sysctlWrite("net/ipv4/conf/"+t.name+"/"+k, v); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return fail(err)
	}
	log := p.opts.Log.With("tunnel", t.name)
	t.dev = device.NewDevice(t.tun, nsBind{Bind: conn.NewStdNetBind(), ns: p.opts.Netns}, &device.Logger{
		Verbosef: device.DiscardLogf,
		Errorf:   func(f string, a ...any) { log.Warn("wireguard: " + fmt.Sprintf(f, a...)) },
	})
	priv, err := NewKey()
	if err != nil {
		return fail(err)
	}
	if err := t.dev.IpcSet("private_key=" + hex.EncodeToString(priv[:]) + "\nlisten_port=0\n"); err != nil {
		return fail(err)
	}
	if err := t.dev.Up(); err != nil {
		return fail(fmt.Errorf("wireguard up: %w", err))
	}
	if t.port, err = t.listenPort(); err != nil {
		return fail(err)
	}
	l, err := h.LinkByName(t.name)
	if err != nil {
		return fail(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fail(fmt.Errorf("set %s up: %w", t.name, err))
	}
	t.index = l.Attrs().Index
	t.mark = markBase | uint32(t.index&0xffff)
	// An address of its own (link-local, host scope: never a source of
	// anything sent): the kernel's reverse-path filter, strict or loose,
	// drops whatever arrives on an interface without any address unless
	// the source is routed back through it, and on host B the clients'
	// packets that come out of the tunnel are not.
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: host32(tunnelAddr(t.index)), Scope: int(netlink.SCOPE_HOST)}); err != nil {
		return fail(fmt.Errorf("address of %s: %w", t.name, err))
	}
	if err := p.withNft(func(c *nftables.Conn) error { return addClampTable(c, t.name) }); err != nil {
		return fail(err)
	}
	log.Info("userspace continuity: tunnel open", "port", t.port, "mtu", mtu)
	return t, nil
}

// tunnelAddr is a TUN's own address, 169.254.X.Y from its ifindex.
func tunnelAddr(index int) netip.Addr {
	return netip.AddrFrom4([4]byte{169, 254, byte(index >> 8), byte(index)})
}

// markBase is the high half of the packet, conntrack and routing-table
// marks of the tunnels ("vh"); the low half is the TUN's ifindex.
const markBase = 0x76680000

func (t *tunnel) listenPort() (uint16, error) {
	s, err := t.dev.IpcGet()
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "listen_port="); ok {
			n, err := strconv.ParseUint(v, 10, 16)
			return uint16(n), err
		}
	}
	return 0, errors.New("wireguard: no listen port")
}

// SetPeer sets the other host of the migration's tunnel (replacing any).
func (p *Path) SetPeer(token uint64, peer Peer) error {
	p.mu.Lock()
	t := p.tunnels[token]
	p.mu.Unlock()
	if t == nil {
		return fmt.Errorf("wgpath: set peer: no tunnel %s", TunnelName(token))
	}
	if peer.Key.IsZero() {
		return fmt.Errorf("wgpath: set peer of %s: no public key", t.name)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "replace_peers=true\npublic_key=%s\n", hex.EncodeToString(peer.Key[:]))
	if peer.Endpoint.IsValid() {
		fmt.Fprintf(&b, "endpoint=%s\n", peer.Endpoint)
	}
	b.WriteString("replace_allowed_ips=true\n")
	for _, a := range peer.Allowed {
		fmt.Fprintf(&b, "allowed_ip=%s\n", a)
	}
	if peer.Keepalive > 0 {
		fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", max(1, int(peer.Keepalive/time.Second)))
	}
	if err := t.dev.IpcSet(b.String()); err != nil {
		return fmt.Errorf("wgpath: set peer of %s: %w", t.name, err)
	}
	return nil
}

// Handshake is the time of the tunnel's last completed WireGuard
// handshake (zero: none yet).
func (p *Path) Handshake(token uint64) (time.Time, error) {
	p.mu.Lock()
	t := p.tunnels[token]
	p.mu.Unlock()
	if t == nil {
		return time.Time{}, fmt.Errorf("wgpath: no tunnel %s", TunnelName(token))
	}
	s, err := t.dev.IpcGet()
	if err != nil {
		return time.Time{}, err
	}
	var sec, nsec int64
	for l := range strings.SplitSeq(s, "\n") {
		if v, ok := strings.CutPrefix(l, "last_handshake_time_sec="); ok {
			sec, _ = strconv.ParseInt(v, 10, 64)
		}
		if v, ok := strings.CutPrefix(l, "last_handshake_time_nsec="); ok {
			nsec, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	if sec == 0 && nsec == 0 {
		return time.Time{}, nil
	}
	return time.Unix(sec, nsec), nil
}

// CloseTunnel removes the migration's WireGuard device (its TUN, the
// routes through it, its nftables table). A token not open is no error.
func (p *Path) CloseTunnel(token uint64) error {
	p.mu.Lock()
	t := p.tunnels[token]
	delete(p.tunnels, token)
	p.mu.Unlock()
	if t == nil {
		return nil
	}
	return p.closeTunnel(t)
}

func (p *Path) closeTunnel(t *tunnel) error {
	t.dev.Close() // closes the TUN: the kernel deletes the device and its routes
	err := p.withNft(func(c *nftables.Conn) error { return delTable(c, t.name) })
	p.opts.Log.Info("userspace continuity: tunnel closed", "tunnel", t.name)
	return err
}

// Close removes everything this Path made on the host: VM entries,
// redirects, tunnels; sysctls it changed are restored.
func (p *Path) Close() error {
	var errs []error
	p.mu.Lock()
	var vms [][2]netip.Addr
	var rds []netip.Addr
	for ip, e := range p.vms {
		vms = append(vms, [2]netip.Addr{ip, e.NewIP})
	}
	for ip := range p.redirects {
		rds = append(rds, ip)
	}
	p.mu.Unlock()
	for _, v := range vms {
		errs = append(errs, p.RemoveVM(v[0], v[1]))
	}
	for _, ip := range rds {
		errs = append(errs, p.RemoveRedirect(ip))
	}
	p.mu.Lock()
	ts := p.tunnels
	p.tunnels = map[uint64]*tunnel{}
	p.mu.Unlock()
	for _, t := range ts {
		errs = append(errs, p.closeTunnel(t))
	}
	return errors.Join(errs...)
}

// nsBind opens wireguard-go's UDP sockets in the host's namespace
// (wireguard-go opens them from whichever goroutine brings the device
// up; a socket belongs to its creating thread's namespace).
type nsBind struct {
	conn.Bind
	ns string
}

func (b nsBind) Open(port uint16) (fns []conn.ReceiveFunc, actual uint16, err error) {
	err = do(b.ns, func() error {
		var e error
		fns, actual, e = b.Bind.Open(port)
		return e
	})
	return fns, actual, err
}

// countTUN counts the IPv4 packets the tunnel carries: read from the TUN
// (routed into the tunnel: on the source, the redirected packets) and
// written to it (arrived through the tunnel), and when the last was read.
type countTUN struct {
	tun.Device
	mtu                              int
	out, outBytes, in, inBytes, last atomic.Uint64
}

// MTU is the MTU the TUN was made with (wireguard-go asks again on link
// events, by name, from a goroutine outside the host's namespace).
func (c *countTUN) MTU() (int, error) { return c.mtu, nil }

func (c *countTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := c.Device.Read(bufs, sizes, offset)
	var pk, by uint64
	for i := range n {
		if sizes[i] > 0 && bufs[i][offset]>>4 == 4 {
			pk++
			by += uint64(sizes[i])
		}
	}
	if pk > 0 {
		c.out.Add(pk)
		c.outBytes.Add(by)
		c.last.Store(uint64(time.Now().UnixNano()))
	}
	return n, err
}

func (c *countTUN) Write(bufs [][]byte, offset int) (int, error) {
	var pk, by uint64
	for _, b := range bufs {
		if len(b) > offset && b[offset]>>4 == 4 {
			pk++
			by += uint64(len(b) - offset)
		}
	}
	// Counted as handed over: the kernel may deliver a packet to its
	// reader before Write returns.
	c.in.Add(pk)
	c.inBytes.Add(by)
	return c.Device.Write(bufs, offset)
}

// Counters are a tunnel's packet counts, named as the eBPF datapath's
// (datapath.CounterNames) where they mean the same: encap_* were sent
// into the tunnel, decap_* came out of it.
type Counters map[string]uint64

func (c *countTUN) counters() Counters {
	return Counters{"encap_packets": c.out.Load(), "encap_bytes": c.outBytes.Load(),
		"decap_packets": c.in.Load(), "decap_bytes": c.inBytes.Load()}
}

// sysctlWrite writes /proc/sys/<path> in the calling thread's namespace.
func sysctlWrite(path, v string) error {
	return os.WriteFile("/proc/sys/"+path, []byte(v), 0o644)
}

func sysctlRead(path string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + path)
	return strings.TrimSpace(string(b)), err
}

// keeper sets sysctls on interfaces the Path does not own and puts the
// original value back when the last user releases it.
type keeper struct {
	refs map[string]int
	orig map[string]string
}

// hold sets path to v (in the host's namespace) and counts a user.
func (p *Path) hold(path, v string) error {
	return p.do(func() error {
		if p.keep.refs[path] == 0 {
			cur, err := sysctlRead(path)
			if err != nil {
				return err
			}
			p.keep.orig[path] = cur
			if cur != v {
				if err := sysctlWrite(path, v); err != nil {
					return err
				}
			}
		}
		p.keep.refs[path]++
		return nil
	})
}

// release drops a user of path; the last one restores the original
// value (an interface gone since is no error).
func (p *Path) release(path string) error {
	if p.keep.refs[path] == 0 {
		return nil
	}
	p.keep.refs[path]--
	if p.keep.refs[path] > 0 {
		return nil
	}
	orig := p.keep.orig[path]
	delete(p.keep.refs, path)
	delete(p.keep.orig, path)
	return p.do(func() error {
		cur, err := sysctlRead(path)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil || cur == orig {
			return err
		}
		return sysctlWrite(path, orig)
	})
}

// garp announces that ip is at mac on interface dev: a gratuitous ARP
// request (sender = target = ip), which updates the neighbours' existing
// entries (Linux overrides on a gratuitous ARP), sent twice.
func (p *Path) garp(dev string, ip netip.Addr, mac net.HardwareAddr) error {
	return p.do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		return sendARP(ifi, garpFrame(ifi.HardwareAddr, mac, ip), 2)
	})
}

// garpFrame is an Ethernet broadcast frame from src carrying a gratuitous
// ARP request: ip is at mac.
func garpFrame(src, mac net.HardwareAddr, ip netip.Addr) []byte {
	a := ip.As4()
	f := make([]byte, 0, 42)
	f = append(f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
	f = append(f, src[:6]...)
	f = append(f, 0x08, 0x06)                // ARP
	f = append(f, 0, 1, 0x08, 0, 6, 4, 0, 1) // Ethernet, IPv4, request
	f = append(f, mac[:6]...)
	f = append(f, a[:]...)
	f = append(f, 0, 0, 0, 0, 0, 0)
	f = append(f, a[:]...)
	return f
}
