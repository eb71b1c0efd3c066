package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/vmhop/vmhop/internal/guest"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
)

// VMConfig describes a lab guest to start.
type VMConfig struct {
	Name   string // 1-8 letters or digits; default "vm"
	Host   string // SiteA (default) or SiteB
	MemMiB int    // default 128; the guest gets TCGPadKiB more (see TCGPadKiB)
	// ExactRAM gives the guest exactly MemMiB, without TCGPadKiB: QEMU 7.2
	// under TCG then loses guest writes in migrations (to reproduce it).
	ExactRAM bool
	DiskSize units.ByteSize // default 256MiB, sparse
	Format   string         // "raw" (default) or "qcow2"
	IP       netip.Addr     // default OldIP; the guest keeps it wherever it runs
	Gateway  netip.Addr     // default GatewayA
	IP6      netip.Addr     // the guest's IPv6 address (a /64); default OldIP6
	Gateway6 netip.Addr     // its IPv6 default gateway; default GatewayA6
	Rate     float64        // disk records per second; default 20, negative disables
	// Prefill writes this many bytes of random data into the image after the
	// guest's record log before boot: a disk with content worth copying.
	Prefill units.ByteSize
	// ExistingDisk boots from the image already at the machine's disk path
	// (a copy made by freeze-and-copy) instead of creating one.
	ExistingDisk bool
	// MemCheckMiB is the guest's RAM verifier's working set
	// (vmhop.memmb); 0: the agent's default (guest.DefaultAgentConfig).
	MemCheckMiB int
	// Incoming starts a migration destination (-incoming defer) whose tap is
	// not yet on the bridge: frames seen before switchover would be replayed
	// into the guest on resume. The disk must exist (the migrator fills it).
	Incoming bool
}

// VM is a running lab guest; its fields are what a migrator needs.
type VM struct {
	Name    string       `json:"name"`
	Host    string       `json:"host"`
	IP      netip.Addr   `json:"ip"`
	Machine qemu.Machine `json:"machine"`
	Pid     int          `json:"pid"`
}

func (l *Lab) fillVMDefaults(c *VMConfig) {
	if c.Name == "" {
		c.Name = "vm"
	}
	if c.Host == "" {
		c.Host = SiteA
	}
	if c.MemMiB == 0 {
		c.MemMiB = 128
	}
	if c.DiskSize == 0 {
		c.DiskSize = 256 * units.MiB
	}
	if c.Format == "" {
		c.Format = "raw"
	}
	if !c.IP.IsValid() {
		c.IP = OldIP
	}
	if !c.Gateway.IsValid() {
		c.Gateway = GatewayA
	}
	if !c.IP6.IsValid() {
		c.IP6 = OldIP6
	}
	if !c.Gateway6.IsValid() {
		c.Gateway6 = GatewayA6
	}
	if c.Rate == 0 {
		c.Rate = 20
	}
}

// memmb is the kernel command line's vmhop.memmb for a verifier of n
// MiB ("" for the default).
func memmb(n int) string {
	if n <= 0 {
		return ""
	}
	return fmt.Sprintf(" vmhop.memmb=%d", n)
}

// TCGPadKiB is added to every lab guest's RAM. QEMU 7.2 (Debian 12) under
// TCG loses guest writes in migrations: the fast path of its dirty-bitmap
// sync (a RAM block whose length is a multiple of 64 pages) does not reset
// the TLB's dirty state, so pages written after a sync are never sent again
// (fixed upstream in QEMU 9.0, commit 03bfc2188f). A RAM block 8 KiB longer
// than a multiple of 256 KiB keeps every sync on the slow path, which resets
// it page by page. See docs/architecture.md, "Known limits".
const TCGPadKiB = 8

// MachineFor returns the QEMU definition of a lab guest on host (files in
// the lab dir, named by VM and host so source and destination do not clash).
func (l *Lab) MachineFor(c VMConfig) (qemu.Machine, error) {
	l.fillVMDefaults(&c)
	kernel, initrd, err := guest.Image()
	if err != nil {
		return qemu.Machine{}, err
	}
	sum := sha256.Sum256([]byte(l.Name + "/" + c.Name))
	rate := c.Rate
	if rate < 0 {
		rate = 0
	}
	id := c.Name + "-" + c.Host
	pad := TCGPadKiB
	if c.ExactRAM {
		pad = 0
	}
	m := qemu.Machine{
		Name:   id,
		MemKiB: c.MemMiB<<10 + pad,
		Kernel: kernel, Initrd: initrd,
		Append: fmt.Sprintf("console=ttyS0 quiet panic=-1 vmhop.ip=%s/24 vmhop.gw=%s vmhop.ip6=%s/64 vmhop.gw6=%s vmhop.rate=%s",
			c.IP, c.Gateway, c.IP6, c.Gateway6, strconv.FormatFloat(rate, 'f', -1, 64)) + memmb(c.MemCheckMiB),
		Disk: l.Path(id + "." + c.Format), DiskFormat: c.Format,
		Tap: "tap-" + c.Name,
		// Same MAC on both hosts: it is the guest's NIC, which moves.
		MAC:       fmt.Sprintf("52:54:00:%02x:%02x:%02x", sum[0], sum[1], sum[2]),
		QMPSocket: l.Path(id + ".qmp"),
		Console:   l.Path(id + ".console"),
		PidFile:   l.Path(id + ".pid"),
	}
	if c.Incoming {
		m.Incoming = "defer"
	}
	return m, nil
}

// StartVM creates the VM's disk (unless Incoming) and tap, and starts QEMU in
// c.Host's namespace. A source VM is ready once WaitGuest returns.
func (l *Lab) StartVM(ctx context.Context, c VMConfig) (*VM, error) {
	l.fillVMDefaults(&c)
	if !nameRE.MatchString(c.Name) {
		return nil, fmt.Errorf("vm name %q: want 1-8 lowercase letters or digits", c.Name)
	}
	m, err := l.MachineFor(c)
	if err != nil {
		return nil, err
	}
	if !c.Incoming && !c.ExistingDisk {
		if err := createDisk(ctx, m.Disk, c.Format, c.DiskSize); err != nil {
			return nil, err
		}
		if c.Prefill > 0 && c.Format != "raw" {
			return nil, fmt.Errorf("prefill: raw images only, not %q", c.Format)
		}
		if c.Prefill > 0 {
			if err := prefill(m.Disk, int64(guest.DefaultAgentConfig().Log.Slots)*guest.RecordSize, int64(c.Prefill)); err != nil {
				return nil, err
			}
		}
	}
	if err := l.AddTap(ctx, c.Host, m.Tap, !c.Incoming); err != nil {
		return nil, err
	}
	args, err := m.Args()
	if err != nil {
		return nil, err
	}
	proc, err := l.startDaemon(c.Host, m.Name+".log", nil, "qemu-system-x86_64", args...)
	if err != nil {
		return nil, err
	}
	if err := waitFor(ctx, 15*time.Second, func() error {
		if isClosed(proc.Exited()) {
			b, _ := os.ReadFile(l.Path(m.Name + ".log"))
			return fmt.Errorf("qemu exited: %s", bytes.TrimSpace(b))
		}
		_, err := os.Stat(m.QMPSocket)
		return err
	}); err != nil {
		return nil, fmt.Errorf("start vm %s: %w", c.Name, err)
	}
	pid := 0
	if b, err := os.ReadFile(m.PidFile); err == nil {
		pid, _ = strconv.Atoi(string(bytes.TrimSpace(b)))
	}
	vm := &VM{Name: c.Name, Host: c.Host, IP: c.IP, Machine: m, Pid: pid}
	l.State.VMs[m.Name] = vm
	l.procMu.Lock()
	if l.procs == nil {
		l.procs = map[string]*Proc{}
	}
	l.procs[m.Name] = proc
	l.procMu.Unlock()
	return vm, l.save()
}

// VMProcess is the QEMU process of machine (a Machine name) if this
// process started it (StartVM), else nil: its ExitStatus says whether and
// how it ended.
func (l *Lab) VMProcess(machine string) *Proc {
	l.procMu.Lock()
	defer l.procMu.Unlock()
	return l.procs[machine]
}

// prefill writes n random bytes to the raw image at path from offset off.
func prefill(path string, off, n int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	for done := int64(0); done < n; done += int64(len(buf)) {
		rand.Read(buf)
		k := min(int64(len(buf)), n-done)
		if _, err := f.WriteAt(buf[:k], off+done); err != nil {
			return fmt.Errorf("prefill %s: %w", path, err)
		}
	}
	return f.Sync()
}

func createDisk(ctx context.Context, path, format string, size units.ByteSize) error {
	if format == "raw" {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Truncate(int64(size))
	}
	out, err := execOutput(ctx, "qemu-img", "create", "-q", "-f", format, path, strconv.FormatUint(uint64(size), 10))
	if err != nil {
		return fmt.Errorf("qemu-img create: %w: %s", err, out)
	}
	return nil
}

// AddTap creates tap dev on host, and puts it on the site bridge if attach.
func (l *Lab) AddTap(ctx context.Context, host, dev string, attach bool) error {
	if _, err := netns.Run(ctx, l.NS(host), "ip", "tuntap", "add", "dev", dev, "mode", "tap"); err != nil {
		return err
	}
	if _, err := netns.Run(ctx, l.NS(host), "ip", "link", "set", dev, "up"); err != nil {
		return err
	}
	if attach {
		return l.AttachTap(ctx, host, dev)
	}
	return nil
}

// AttachTap puts a VM's tap on the host's bridge: the switchover step for a
// destination VM.
func (l *Lab) AttachTap(ctx context.Context, host, dev string) error {
	_, err := netns.Run(ctx, l.NS(host), "ip", "link", "set", dev, "master", LANIf(host))
	return err
}

// DialTCP connects from host's namespace.
func (l *Lab) DialTCP(ctx context.Context, host string, to netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return l.Dialer(host)(ctx, "tcp", to.String())
}

// Echo sends payload to the guest's TCP echo service at ip from host and
// checks it comes back intact.
func (l *Lab) Echo(ctx context.Context, host string, ip netip.Addr, payload []byte) error {
	c, err := l.DialTCP(ctx, host, netip.AddrPortFrom(ip, 7))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(payload); err != nil {
		return err
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("echo from %s: %w", ip, err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo from %s: got different bytes back", ip)
	}
	return nil
}

// HTTPClient returns a client whose connections start in host's namespace.
func (l *Lab) HTTPClient(host string) *http.Client {
	return &http.Client{
		Timeout: 15 * time.Second, // TCG guests are slow to fault in memory
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				ap, err := netip.ParseAddrPort(addr)
				if err != nil {
					return nil, err
				}
				return l.DialTCP(ctx, host, ap)
			},
		},
	}
}

// GuestStatus fetches the agent's /status from host.
func (l *Lab) GuestStatus(ctx context.Context, host string, ip netip.Addr) (guest.Status, error) {
	var s guest.Status
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+ip.String()+"/status", nil)
	resp, err := l.HTTPClient(host).Do(req)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("guest status: %s", resp.Status)
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

// GuestVerify asks the guest at ip to read its disk record log back
// (bypassing its page cache) and report whether every record up to acked is
// there (guest.Log.Verify).
func (l *Lab) GuestVerify(ctx context.Context, host string, ip netip.Addr, acked uint64) (guest.Report, error) {
	var r guest.Report
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+ip.String()+"/verify?acked="+strconv.FormatUint(acked, 10), nil)
	resp, err := l.HTTPClient(host).Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("guest verify: %s", resp.Status)
	}
	return r, json.NewDecoder(resp.Body).Decode(&r)
}

// WaitGuest waits until the guest answers echo from the client.
func (l *Lab) WaitGuest(ctx context.Context, ip netip.Addr, timeout time.Duration) error {
	return waitFor(ctx, timeout, func() error {
		return l.Echo(ctx, Client, ip, []byte("ping\n"))
	})
}

// Launcher starts programs in host's namespace: the lab's stand-in for the
// destination host's vmhopd starting QEMU.
func (l *Lab) Launcher(host string) qemu.Launcher { return launcher{l, host} }

type launcher struct {
	l    *Lab
	host string
}

func (la launcher) Launch(ctx context.Context, name, prog string, args []string) (qemu.Process, error) {
	return la.l.startDaemon(la.host, name+".log", nil, prog, args...)
}

// GuestLink lets host talk to a lab guest that moved onto its LAN but kept
// its site A address and its neighbour cache: a macvlan on host's bridge
// takes the guest's gateway's MAC and address, and routes to the guest. It
// stands in for the datapath in tests of the runtime migration alone.
func (l *Lab) GuestLink(ctx context.Context, host string, guestIP, guestGW netip.Addr) error {
	mac, err := l.RouterMAC(SiteA)
	if err != nil {
		return err
	}
	ns := l.NS(host)
	for _, args := range [][]string{
		{"link", "add", "vhgw", "link", LANIf(host), "type", "macvlan", "mode", "bridge"},
		{"link", "set", "vhgw", "address", mac.String(), "up"},
		{"addr", "add", guestGW.String() + "/32", "dev", "vhgw"},
		{"route", "add", guestIP.String() + "/32", "dev", "vhgw", "src", guestGW.String()},
	} {
		if _, err := netns.Run(ctx, ns, "ip", args...); err != nil {
			return err
		}
	}
	return nil
}

// RouterMAC returns the MAC of the WAN router's interface on site's LAN:
// what a guest at that site has in its neighbour cache for its gateway.
func (l *Lab) RouterMAC(site string) (net.HardwareAddr, error) {
	h, err := l.handle(WAN)
	if err != nil {
		return nil, err
	}
	defer h.close()
	for _, a := range accesses {
		if a.host == site {
			link, err := h.LinkByName(a.routerIf)
			if err != nil {
				return nil, err
			}
			return link.Attrs().HardwareAddr, nil
		}
	}
	return nil, fmt.Errorf("no router interface for %q", site)
}

// CopyDisk copies a disk image sparsely (a destination's starting point when
// the test is about memory, not storage).
func CopyDisk(ctx context.Context, from, to string) error {
	out, err := execOutput(ctx, "cp", "--sparse=always", from, to)
	if err != nil {
		return fmt.Errorf("copy disk: %w: %s", err, out)
	}
	return nil
}

// MoveVM records that the VM named from (a Machine name) now runs as dest on host.
func (l *Lab) MoveVM(from string, dest qemu.Machine, host string) error {
	old, ok := l.State.VMs[from]
	if !ok {
		return fmt.Errorf("no vm %q in lab %s", from, l.Name)
	}
	delete(l.State.VMs, from)
	pid := 0
	if b, err := os.ReadFile(dest.PidFile); err == nil {
		pid, _ = strconv.Atoi(string(bytes.TrimSpace(b)))
	}
	l.State.VMs[dest.Name] = &VM{Name: old.Name, Host: host, IP: old.IP, Machine: dest, Pid: pid}
	return l.save()
}
