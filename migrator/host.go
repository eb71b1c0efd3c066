package migrator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

// SourceHost is the source host's own work in a migration, as the core
// asks for it: on a deployment, what vmhopd on host A does; in the lab
// and in one process, a *Host. Arguments and results are plain structs
// that encode to JSON, so a peer channel can carry each call as it is.
type SourceHost interface {
	// PrepareSource loads the host's datapath on its uplink, accepts the
	// destination as a tunnel peer, and installs the redirect for the
	// VM's old address, off (switching it on later is one map write). It
	// answers its end of the tunnel (its continuity mode; in userspace
	// mode its WireGuard public key and port), which the destination
	// gets in VMAttach.Tunnel. A destination whose mode (req.Tunnel's
	// Continuity) is not this host's is refused.
	PrepareSource(ctx context.Context, req SourcePrepare) (TunnelEnd, error)
	// SetRedirect switches the old address's redirect on or off.
	SetRedirect(ctx context.Context, req RedirectSwitch) error
	// RemoveRedirect removes the redirect (undo; the end of the drain).
	RemoveRedirect(ctx context.Context, req RedirectRemove) error
	// RetireTunnel stops accepting the migration's tunnel (undo; the end
	// of the drain).
	RetireTunnel(ctx context.Context, req Tunnel) error
	// RedirectState reads the redirect's counters and idle time.
	RedirectState(ctx context.Context, req RedirectQuery) (RedirectState, error)
	// StatImage reports the source image's size.
	StatImage(ctx context.Context, req ImageRef) (ImageInfo, error)
	// HashImage hashes the host's own image (see HashRequest).
	HashImage(ctx context.Context, req HashRequest) (Digests, error)
	AddressHolder
}

// Destination is the destination host's own work in a migration: on a
// deployment, what vmhopd on host B does; in the lab, a *Host.
// Arguments and results encode to JSON, like SourceHost's.
type Destination interface {
	// PrepareDestination loads the host's datapath on its uplink and
	// accepts the source as a tunnel peer (userspace mode: opens the
	// migration's WireGuard device, its peer set by AttachVM). It answers
	// its end of the tunnel, which the source gets in SourcePrepare.
	PrepareDestination(ctx context.Context, req DestPrepare) (TunnelEnd, error)
	// CreateImage creates the destination image, empty (sparse) and of
	// the source's size. An existing file is refused (ErrImageExists):
	// never truncated.
	CreateImage(ctx context.Context, req ImageCreate) error
	// AttachVM attaches the VM program to the VM's tap and installs the
	// VM's entry (NAT, gateway, tunnel peer while the redirect lasts).
	// Packets for the VM arriving before it resumes wait in its tap.
	AttachVM(ctx context.Context, req VMAttach) error
	// HashImage hashes the host's own image (see HashRequest).
	HashImage(ctx context.Context, req HashRequest) (Digests, error)
	// RetireTunnel stops accepting the migration's tunnel.
	RetireTunnel(ctx context.Context, req Tunnel) error
	// Abort removes what this migration made on the host: the VM entry,
	// and the image if CreateImage made it.
	Abort(ctx context.Context, req DestAbort) error
	AddressHolder
}

// ErrImageExists is CreateImage's refusal to overwrite a file.
var ErrImageExists = errors.New("destination image exists")

// Tunnel is one migration's tunnel to the other host (datapath.Tunnel):
// its WAN address and the migration's token, the same on both hosts (a
// secret: packets from the peer's address without it are dropped). In
// userspace continuity the token names the migration's WireGuard device
// and Key and Port are the peer's end of it (TunnelEnd).
type Tunnel struct {
	Peer  netip.Addr `json:"peer"`
	Token uint64     `json:"token"`
	// Continuity is the peer's mode ("ebpf", "userspace"; "": ebpf or
	// not known yet); a host refuses a peer of another mode.
	Continuity string `json:"continuity,omitempty"`
	Key        string `json:"key,omitempty"`  // the peer's WireGuard public key (base64)
	Port       uint16 `json:"port,omitempty"` // the peer's WireGuard UDP port on Peer
}

// TunnelEnd is a host's end of a migration's tunnel, answered by
// PrepareSource and PrepareDestination: its continuity mode and, in
// userspace mode, the public key of the key pair it made for this
// migration (base64; the private key never leaves the host) and the UDP
// port its WireGuard device listens on (all addresses).
type TunnelEnd struct {
	Continuity string `json:"continuity"`
	Key        string `json:"key,omitempty"`
	Port       uint16 `json:"port,omitempty"`
}

// Continuity modes (Host.Continuity, TunnelEnd.Continuity).
const (
	ContinuityEBPF      = "ebpf"
	ContinuityUserspace = "userspace"
)

func (t Tunnel) datapath() datapath.Tunnel { return datapath.Tunnel{Peer: t.Peer, Token: t.Token} }

// SourcePrepare readies the source host (SourceHost.PrepareSource).
type SourcePrepare struct {
	Tunnel Tunnel     `json:"tunnel"` // to the destination
	OldIP  netip.Addr `json:"old_ip"` // the VM's address at the source
	MAC    string     `json:"mac"`    // the VM's MAC, "52:54:00:..."
	// OldIP6 is a dual-stack VM's IPv6 address at the source (redirected
	// with OldIP, counted as OldIP); invalid: none.
	OldIP6 netip.Addr `json:"old_ip6,omitzero"`
}

// RedirectSwitch turns the old address's redirect on or off.
type RedirectSwitch struct {
	OldIP  netip.Addr `json:"old_ip"`
	OldIP6 netip.Addr `json:"old_ip6,omitzero"` // switched with OldIP
	Tunnel Tunnel     `json:"tunnel"`
	MAC    string     `json:"mac"`
	On     bool       `json:"on"`
}

// RedirectRemove removes the old address's redirect.
type RedirectRemove struct {
	OldIP  netip.Addr `json:"old_ip"`
	OldIP6 netip.Addr `json:"old_ip6,omitzero"` // removed with OldIP
}

// RedirectQuery names the redirect to read.
type RedirectQuery struct {
	OldIP netip.Addr `json:"old_ip"`
}

// RedirectState is the redirect's datapath counters (names as
// datapath.Counters) and how long ago it last carried a packet.
type RedirectState struct {
	Counters datapath.Counters `json:"counters"`
	Idle     time.Duration     `json:"idle_ns"`
	Seen     bool              `json:"seen"` // a packet was redirected at all
}

// ImageRef names an image on a host.
type ImageRef struct {
	Path string `json:"path"`
}

// ImageInfo describes an image.
type ImageInfo struct {
	Size      int64 `json:"size"`                // bytes
	Allocated int64 `json:"allocated,omitempty"` // bytes the filesystem holds for it (holes are free)
}

// ImageCreate asks for an empty image of Size bytes at Path.
type ImageCreate struct {
	Path string `json:"path"`
	Size int64  `json:"size"`
	// Need is how many bytes the copy will write (the source image's
	// allocated bytes; 0: Size): less free space is refused
	// (storage.ErrNoSpace), before anything is copied.
	Need int64 `json:"need,omitempty"`
}

// DestPrepare readies the destination host (Destination.PrepareDestination).
type DestPrepare struct {
	Tunnel Tunnel `json:"tunnel"` // to the source
}

// VMAttach is the VM's network on the destination host.
type VMAttach struct {
	Tap        string     `json:"tap"`
	OldIP      netip.Addr `json:"old_ip"`
	NewIP      netip.Addr `json:"new_ip"`
	Gateway    netip.Addr `json:"gateway"`
	GatewayMAC string     `json:"gateway_mac"`
	MAC        string     `json:"mac"`
	// A dual-stack VM's IPv6 side (datapath.VM); invalid: none.
	OldIP6   netip.Addr `json:"old_ip6,omitzero"`
	NewIP6   netip.Addr `json:"new_ip6,omitzero"`
	Gateway6 netip.Addr `json:"gateway6,omitzero"`
	// Tunnel carries the VM's old flows back to the source; zero once
	// drained.
	Tunnel Tunnel `json:"tunnel"`
}

// HashRequest asks a host for its image's digest. Whole hashes every
// chunk and keeps the chunk hashes; otherwise only Chunks (DigestChunk
// indexes) are re-hashed on top of the kept ones.
type HashRequest struct {
	Path   string  `json:"path"`
	Whole  bool    `json:"whole"`
	Chunks []int64 `json:"chunks,omitempty"`
}

// Digests is a host's answer to HashRequest: the image's root digest
// (storage.Hashes.Root: SHA-256 over per-chunk xxh3-128) and how many
// bytes were read for it (holes are free).
type Digests struct {
	Root []byte `json:"root"`
	Read int64  `json:"read"`
}

// DestAbort names what Destination.Abort removes.
type DestAbort struct {
	OldIP  netip.Addr `json:"old_ip"`
	NewIP  netip.Addr `json:"new_ip"`
	OldIP6 netip.Addr `json:"old_ip6,omitzero"`
	NewIP6 netip.Addr `json:"new_ip6,omitzero"`
	Image  string     `json:"image"`
	// KeepImage keeps the image even if CreateImage made it (a fallback
	// after the destination ran: it holds the destination VM's writes).
	KeepImage bool `json:"keep_image,omitempty"`
}

// Host is one end of a migration run in this process: its continuity
// datapath (Continuity: the eBPF datapath, or the userspace packet path
// of proxy/wgpath), in its network namespace, and its images on the local
// filesystem. It implements SourceHost and Destination (a vmhopd is the
// source of some migrations and the destination of others); in the lab,
// each host is a namespace on this machine.
type Host struct {
	Name    string
	Netns   string     // network namespace; "" is this process's
	Address netip.Addr // WAN address: tunnel endpoint, migration streams
	Uplink  string     // WAN-facing interface the datapath attaches to
	PinDir  string     // bpffs directory for the datapath's pins
	// Continuity is "ebpf" (or "") for the eBPF datapath on Uplink, or
	// "userspace" for proxy/wgpath (WireGuard tunnel, routes, proxy ARP,
	// nftables NAT), where eBPF cannot load.
	Continuity string
	dp         *datapath.Datapath
	wgMu       sync.Mutex // guards wg (not mu: an image hash holds mu for long)
	wg         *wgpath.Path

	mu      sync.Mutex
	hashes  map[string]*storage.Hashes // per image path, from the last Whole hash
	created map[string]bool            // images CreateImage made
}

var (
	_ SourceHost  = (*Host)(nil)
	_ Destination = (*Host)(nil)
)

func (h *Host) do(fn func() error) error {
	if h.Netns == "" {
		return fn()
	}
	return netns.Do(h.Netns, fn)
}

// UseDatapath makes the host use dp, loaded and attached to its uplink
// already (vmhopd's, which loads it at start), instead of loading its own.
func (h *Host) UseDatapath(dp *datapath.Datapath) { h.dp = dp }

// Datapath loads and attaches the host's datapath once.
func (h *Host) Datapath() (*datapath.Datapath, error) {
	if h.dp != nil {
		return h.dp, nil
	}
	dp, err := datapath.Load(datapath.Options{LocalIP: h.Address, PinDir: h.PinDir})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	if err := h.do(func() error { return dp.Attach(datapath.Uplink, h.Uplink) }); err != nil {
		dp.Close()
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	h.dp = dp
	return dp, nil
}

// userspace says whether the host runs proxy/wgpath, or refuses an
// unknown mode.
func (h *Host) userspace() (bool, error) {
	switch h.Continuity {
	case "", ContinuityEBPF:
		return false, nil
	case ContinuityUserspace:
		return true, nil
	}
	return false, fmt.Errorf("%s: continuity %q: want %q or %q", h.Name, h.Continuity, ContinuityEBPF, ContinuityUserspace)
}

func (h *Host) mode() string {
	if us, _ := h.userspace(); us {
		return ContinuityUserspace
	}
	return ContinuityEBPF
}

// checkPeer refuses a peer whose continuity mode is known and not this
// host's: an eBPF tunnel and a WireGuard one do not meet.
func (h *Host) checkPeer(t Tunnel) error {
	if t.Continuity != "" && t.Continuity != h.mode() {
		return fmt.Errorf("%s: continuity is %s here, %s on the peer %s: both hosts must use the same (vmhopd's datapath key)",
			h.Name, h.mode(), t.Continuity, t.Peer)
	}
	return nil
}

// Userspace is the host's userspace continuity, made on first use.
func (h *Host) Userspace() *wgpath.Path {
	h.wgMu.Lock()
	defer h.wgMu.Unlock()
	if h.wg == nil {
		h.wg = wgpath.New(wgpath.Options{Netns: h.Netns, LocalIP: h.Address})
	}
	return h.wg
}

// openTunnel opens the migration's WireGuard device (userspace mode).
func (h *Host) openTunnel(t Tunnel) (TunnelEnd, error) {
	key, port, err := h.Userspace().OpenTunnel(t.Token)
	if err != nil {
		return TunnelEnd{}, fmt.Errorf("%s: %w", h.Name, err)
	}
	return TunnelEnd{Continuity: ContinuityUserspace, Key: key.String(), Port: port}, nil
}

// wgPeer is the WireGuard peer a Tunnel names: allowed, the inner
// addresses accepted from it and routed to it; keepalive starts the
// handshake at once.
func wgPeer(t Tunnel, allowed netip.Prefix, keepalive time.Duration) (wgpath.Peer, error) {
	k, err := wgpath.ParseKey(t.Key)
	if err != nil {
		return wgpath.Peer{}, fmt.Errorf("tunnel to %s: %w", t.Peer, err)
	}
	if t.Port == 0 {
		return wgpath.Peer{}, fmt.Errorf("tunnel to %s: no WireGuard port", t.Peer)
	}
	return wgpath.Peer{Key: k, Endpoint: netip.AddrPortFrom(t.Peer, t.Port), Allowed: []netip.Prefix{allowed}, Keepalive: keepalive}, nil
}

// Keepalive is the WireGuard keepalive the destination sends while a
// migration's tunnel lasts: its first starts the handshake as soon as
// AttachVM knows the source, so the switch finds the session made.
const Keepalive = 25 * time.Second

// PrepareSource implements SourceHost.
func (h *Host) PrepareSource(_ context.Context, req SourcePrepare) (TunnelEnd, error) {
	mac, err := parseMAC("mac", req.MAC)
	if err != nil {
		return TunnelEnd{}, err
	}
	us, err := h.userspace()
	if err != nil {
		return TunnelEnd{}, err
	}
	if err := h.checkPeer(req.Tunnel); err != nil {
		return TunnelEnd{}, err
	}
	if us {
		peer, err := wgPeer(req.Tunnel, netip.PrefixFrom(req.OldIP, 32), 0)
		if err != nil {
			return TunnelEnd{}, fmt.Errorf("%s: %w", h.Name, err)
		}
		end, err := h.openTunnel(req.Tunnel)
		if err != nil {
			return end, err
		}
		wg := h.Userspace()
		err = wg.SetPeer(req.Tunnel.Token, peer)
		if err == nil {
			err = wg.SetRedirect(req.OldIP, req.Tunnel.Token, mac, false)
		}
		if err != nil { // the core undoes only what was answered
			return end, errors.Join(err, wg.RemoveRedirect(req.OldIP), wg.CloseTunnel(req.Tunnel.Token))
		}
		return end, nil
	}
	a, err := h.Datapath()
	if err != nil {
		return TunnelEnd{}, err
	}
	if err := a.SetPeer(req.Tunnel.datapath(), true); err != nil {
		return TunnelEnd{}, err
	}
	if err := a.SetRedirect(req.OldIP, req.Tunnel.datapath(), mac, false); err != nil {
		return TunnelEnd{}, err
	}
	if req.OldIP6.IsValid() {
		if err := a.SetRedirect6(req.OldIP6, req.OldIP, req.Tunnel.datapath(), mac, false); err != nil {
			return TunnelEnd{}, err
		}
	}
	return TunnelEnd{Continuity: ContinuityEBPF}, nil
}

// SetRedirect implements SourceHost.
func (h *Host) SetRedirect(_ context.Context, req RedirectSwitch) error {
	mac, err := parseMAC("mac", req.MAC)
	if err != nil {
		return err
	}
	if h.Continuity == ContinuityUserspace {
		return h.Userspace().SetRedirect(req.OldIP, req.Tunnel.Token, mac, req.On)
	}
	if h.dp == nil {
		return fmt.Errorf("%s: set redirect: datapath not loaded", h.Name)
	}
	if err := h.dp.SetRedirect(req.OldIP, req.Tunnel.datapath(), mac, req.On); err != nil {
		return err
	}
	if req.OldIP6.IsValid() {
		return h.dp.SetRedirect6(req.OldIP6, req.OldIP, req.Tunnel.datapath(), mac, req.On)
	}
	return nil
}

// RemoveRedirect implements SourceHost.
func (h *Host) RemoveRedirect(_ context.Context, req RedirectRemove) error {
	if h.Continuity == ContinuityUserspace {
		return h.Userspace().RemoveRedirect(req.OldIP)
	}
	if h.dp == nil {
		return nil
	}
	err := h.dp.RemoveRedirect(req.OldIP)
	if req.OldIP6.IsValid() {
		err = errors.Join(err, h.dp.RemoveRedirect(req.OldIP6))
	}
	return err
}

// RetireTunnel implements SourceHost and Destination.
func (h *Host) RetireTunnel(_ context.Context, req Tunnel) error {
	if h.Continuity == ContinuityUserspace {
		if req.Token == 0 {
			return nil
		}
		return h.Userspace().CloseTunnel(req.Token)
	}
	if h.dp == nil || req.Token == 0 {
		return nil
	}
	return h.dp.SetPeer(req.datapath(), false)
}

// RedirectState implements SourceHost.
func (h *Host) RedirectState(_ context.Context, req RedirectQuery) (RedirectState, error) {
	var st RedirectState
	if h.Continuity == ContinuityUserspace {
		c, idle, seen, err := h.Userspace().RedirectStats(req.OldIP)
		return RedirectState{Counters: datapath.Counters(c), Idle: idle, Seen: seen}, err
	}
	if h.dp == nil {
		return st, fmt.Errorf("%s: redirect state: datapath not loaded", h.Name)
	}
	idle, seen, err := h.dp.Idle(req.OldIP)
	if err != nil {
		return st, err
	}
	st.Idle, st.Seen = idle, seen
	st.Counters, err = h.dp.Stats(req.OldIP)
	return st, err
}

// StatImage implements SourceHost.
func (h *Host) StatImage(_ context.Context, req ImageRef) (ImageInfo, error) {
	st, err := os.Stat(req.Path)
	if err != nil {
		return ImageInfo{}, fmt.Errorf("%s: %w", h.Name, err)
	}
	info := ImageInfo{Size: st.Size()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		info.Allocated = sys.Blocks * 512
	}
	return info, nil
}

// HashImage implements SourceHost and Destination.
func (h *Host) HashImage(_ context.Context, req HashRequest) (Digests, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if req.Whole {
		hs, err := storage.HashImage(req.Path)
		if err != nil {
			return Digests{}, fmt.Errorf("%s: hash image: %w", h.Name, err)
		}
		if h.hashes == nil {
			h.hashes = map[string]*storage.Hashes{}
		}
		h.hashes[req.Path] = hs
		return Digests{Root: hs.Root(), Read: hs.Read}, nil
	}
	hs := h.hashes[req.Path]
	if hs == nil {
		return Digests{}, fmt.Errorf("%s: hash image %q: chunks asked for before a whole hash", h.Name, req.Path)
	}
	before := hs.Read
	if err := hs.Update(req.Chunks); err != nil {
		return Digests{}, fmt.Errorf("%s: hash image: %w", h.Name, err)
	}
	return Digests{Root: hs.Root(), Read: hs.Read - before}, nil
}

// PrepareDestination implements Destination.
func (h *Host) PrepareDestination(_ context.Context, req DestPrepare) (TunnelEnd, error) {
	us, err := h.userspace()
	if err != nil {
		return TunnelEnd{}, err
	}
	if err := h.checkPeer(req.Tunnel); err != nil {
		return TunnelEnd{}, err
	}
	if us {
		return h.openTunnel(req.Tunnel)
	}
	b, err := h.Datapath()
	if err != nil {
		return TunnelEnd{}, err
	}
	return TunnelEnd{Continuity: ContinuityEBPF}, b.SetPeer(req.Tunnel.datapath(), true)
}

// CreateImage implements Destination: O_EXCL, so an existing file (a
// migration of the same VM under way, or a VM living there) is refused.
func (h *Host) CreateImage(_ context.Context, req ImageCreate) error {
	if err := h.checkSpace(req); err != nil {
		return err
	}
	f, err := os.OpenFile(req.Path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s: create image %q: %w", h.Name, req.Path, ErrImageExists)
	}
	if err != nil {
		return fmt.Errorf("%s: create image: %w", h.Name, err)
	}
	err = f.Truncate(req.Size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(req.Path)
		return fmt.Errorf("%s: create image %q: %w", h.Name, req.Path, err)
	}
	h.mu.Lock()
	if h.created == nil {
		h.created = map[string]bool{}
	}
	h.created[req.Path] = true
	h.mu.Unlock()
	return nil
}

// MarkCreated records that CreateImage made the image at path (a
// restarted vmhopd learns it from its own record), so Abort removes it.
func (h *Host) MarkCreated(path string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.created == nil {
		h.created = map[string]bool{}
	}
	h.created[path] = true
}

// freeBytes is the space an unprivileged writer has on the filesystem
// holding dir (tests replace it).
var freeBytes = func(dir string) (int64, error) {
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		return 0, err
	}
	return int64(fs.Bavail) * fs.Bsize, nil
}

// checkSpace refuses an image the filesystem has no room for, naming the
// host, the path and both sizes.
func (h *Host) checkSpace(req ImageCreate) error {
	need := req.Need
	if need <= 0 {
		need = req.Size
	}
	dir := filepath.Dir(req.Path)
	free, err := freeBytes(dir)
	if err != nil {
		return fmt.Errorf("%s: create image %q: free space of %s: %w", h.Name, req.Path, dir, err)
	}
	if free < need {
		return fmt.Errorf("%s: create image %q: %w: the copy needs %d MiB, %s has %d MiB free",
			h.Name, req.Path, storage.ErrNoSpace, (need+1<<20-1)>>20, dir, free>>20)
	}
	return nil
}

// AttachVM implements Destination.
func (h *Host) AttachVM(_ context.Context, req VMAttach) error {
	mac, err := parseMAC("mac", req.MAC)
	if err != nil {
		return err
	}
	gwMAC, err := parseMAC("gateway_mac", req.GatewayMAC)
	if err != nil {
		return err
	}
	if h.Continuity == ContinuityUserspace {
		return h.attachUserspace(req, mac, gwMAC)
	}
	if h.dp == nil {
		return fmt.Errorf("%s: attach vm: datapath not loaded", h.Name)
	}
	var idx int
	if err := h.do(func() error {
		ifi, err := net.InterfaceByName(req.Tap)
		if err != nil {
			return err
		}
		idx = ifi.Index
		return h.dp.Attach(datapath.VMTap, req.Tap)
	}); err != nil {
		return fmt.Errorf("%s: attach vm: %w", h.Name, err)
	}
	return h.dp.SetVM(datapath.VM{OldIP: req.OldIP, NewIP: req.NewIP, Gateway: req.Gateway, GatewayMAC: gwMAC,
		MAC: mac, Tap: idx, Peer: req.Tunnel.Peer, Token: req.Tunnel.Token,
		OldIP6: req.OldIP6, NewIP6: req.NewIP6, Gateway6: req.Gateway6})
}

// attachUserspace is AttachVM in userspace mode: the tunnel's peer (the
// source; allowed IPs 0.0.0.0/0: the VM's replies go to any client),
// then the VM's entry (wgpath.SetVM); without a tunnel (the drain), the
// entry without its tunnel part.
func (h *Host) attachUserspace(req VMAttach, mac, gwMAC net.HardwareAddr) error {
	if err := h.checkPeer(req.Tunnel); err != nil {
		return err
	}
	wg := h.Userspace()
	if req.Tunnel.Token != 0 {
		peer, err := wgPeer(req.Tunnel, netip.MustParsePrefix("0.0.0.0/0"), Keepalive)
		if err != nil {
			return fmt.Errorf("%s: attach vm: %w", h.Name, err)
		}
		if err := wg.SetPeer(req.Tunnel.Token, peer); err != nil {
			return fmt.Errorf("%s: attach vm: %w", h.Name, err)
		}
	}
	if err := wg.SetVM(wgpath.VM{OldIP: req.OldIP, NewIP: req.NewIP, GatewayMAC: gwMAC, MAC: mac, Tap: req.Tap,
		Token: req.Tunnel.Token}); err != nil {
		return fmt.Errorf("%s: attach vm: %w", h.Name, err)
	}
	return nil
}

// Abort implements Destination.
func (h *Host) Abort(_ context.Context, req DestAbort) error {
	var errs []error
	if h.dp != nil && req.OldIP.IsValid() {
		errs = append(errs, h.dp.RemoveVM(req.OldIP, req.NewIP))
	}
	if h.dp != nil && req.OldIP6.IsValid() {
		errs = append(errs, h.dp.RemoveVM(req.OldIP6, req.NewIP6))
	}
	if h.Continuity == ContinuityUserspace && req.OldIP.IsValid() {
		errs = append(errs, h.Userspace().RemoveVM(req.OldIP, req.NewIP))
	}
	h.mu.Lock()
	made := h.created[req.Image] && !req.KeepImage
	delete(h.created, req.Image)
	delete(h.hashes, req.Image)
	h.mu.Unlock()
	if made {
		for _, f := range []string{req.Image, req.Image + ".manifest"} {
			if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// RemoveDatapath detaches and unpins everything this host's datapath
// holds, and removes everything its userspace continuity made (tunnels,
// routes, rules, nftables tables, VM entries).
func (h *Host) RemoveDatapath() error {
	var errs []error
	h.wgMu.Lock()
	wg := h.wg
	h.wg = nil
	h.wgMu.Unlock()
	if wg != nil {
		errs = append(errs, wg.Close())
	}
	if h.dp != nil {
		errs = append(errs, h.do(h.dp.Remove))
		h.dp = nil
	}
	return errors.Join(errs...)
}

func parseMAC(field, s string) (net.HardwareAddr, error) {
	m, err := net.ParseMAC(s)
	if err != nil || len(m) != 6 {
		return nil, fmt.Errorf("%s %q: want a 6-byte MAC: %v", field, s, err)
	}
	return m, nil
}
