package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

// HostWork is this host's own part of migrations, as vmhopd does it: the
// destination half other hosts' daemons call over the peer API
// (migrator.Destination, storage.DiskServer, qemu.Incoming, the port
// reservations) and the source half this host's own migrations use
// (migrator.SourceHost). One per vmhopd; everything it touches is on
// this host. Incoming migrations are kept apart by their key (the
// calling peer and its migration ID, incomingKey): any number may run
// at once, each with its own ports, QEMU, taps, secrets and record.
type HostWork struct {
	Host     *migrator.Host           // the datapath and the images
	Disks    *storage.LocalDiskServer // the destination ends of disk streams
	Launcher qemu.Launcher            // starts destination QEMUs; nil: a ProcessLauncher in StateDir/vms
	StateDir string                   // vmhopd.state_dir: incoming migrations' secrets go under it
	// Ports is vmhopd.migration_ports, the range incoming migrations'
	// ports are taken from; zero: config.DefaultDaemon's.
	Ports config.PortRange
	// PortFree says whether a port of Ports is free on this host; nil:
	// a TCP listener on every address can take it (tests fake it).
	PortFree func(port uint16) bool
	Log      *slog.Logger

	in    incomings
	ports portPool
	recMu sync.Mutex
	recs  map[string]*incomingRecord // by incomingKey
}

// Peer methods of the port reservation, this host's own (not part of
// qemu.Incoming): the source reserves its migration's ports before
// anything else and releases them when its job ends.
const (
	MethodIncomingReserve = "incoming.reserve"
	MethodIncomingRelease = "incoming.release"
)

// Register serves w's destination half on a (before Serve).
func (w *HostWork) Register(a *PeerAPI) {
	if w.Launcher == nil {
		w.Launcher = &ProcessLauncher{Dir: filepath.Join(w.StateDir, "vms"), OnStart: func(ctx context.Context, pid int) {
			if err := w.record(ctx, func(r *incomingRecord) { r.PID = pid }); err != nil {
				w.Log.Error("record the destination QEMU", "pid", pid, "err", err)
			}
		}}
	}
	if w.Log == nil {
		w.Log = slog.Default()
	}
	w.in.w = w
	w.ports.rng, w.ports.free = w.Ports, w.PortFree
	if w.ports.rng.Len() == 0 {
		w.ports.rng = config.DefaultDaemon().MigrationPorts
	}
	ServeDestination(a, recordingDest{w})
	ServeDiskServer(a, reservedDisks{w})
	ServeIncoming(a, &w.in)
	Handle(a, MethodIncomingReserve, func(ctx context.Context, from string, _ Empty) (MigrationPorts, error) {
		p, err := w.in.Reserve(ctx)
		if err == nil {
			a.leases.track(from, func(l *Lease) {
				if id := migrationID(ctx); !slices.Contains(l.Reserved, id) {
					l.Reserved = append(l.Reserved, id)
				}
			})
		}
		return p, err
	})
	Handle(a, MethodIncomingRelease, func(ctx context.Context, from string, _ Empty) (Empty, error) {
		err := w.in.Release(ctx)
		a.leases.track(from, func(l *Lease) {
			id := migrationID(ctx)
			del := func(s string) bool { return s == id }
			l.Reserved = slices.DeleteFunc(l.Reserved, del)
			l.Incoming = slices.DeleteFunc(l.Incoming, del)
			l.Committed = slices.DeleteFunc(l.Committed, del)
		})
		return Empty{}, err
	})
}

// PortsInUse is how many ports of vmhopd.migration_ports incoming
// migrations hold on this host.
func (w *HostWork) PortsInUse() int { return w.ports.inUse() }

// incomings is the host's qemu.Incoming over the peer API, one incoming
// migration per key (incomingKey: the peer and the Vmhop-Migration ID
// of the call's context). Each keeps its PSK under this host's
// state_dir, whatever directory the source names, and makes and removes
// the taps its destination QEMU uses. Once its VM runs here
// (WaitRunning succeeded) it lets go of it: the QEMU and its taps stay.
// Its ports (Reserve) are held until Release.
type incomings struct {
	w *HostWork

	mu sync.Mutex
	m  map[string]*incoming
}

// incoming is one incoming migration.
type incoming struct {
	key      string
	ports    MigrationPorts
	reserved bool

	mu      sync.Mutex // Start, Stop, Release: one at a time
	cur     *qemu.LocalIncoming
	name    string
	taps    []string // made for cur; removed by Stop
	pskDir  string
	landed  bool     // cur's VM runs here
	listens []string // disk servers' listen addresses it started (reservedDisks)
}

var _ qemu.Incoming = (*incomings)(nil)

// slotNameRE is a QEMU -name as a path component.
var slotNameRE = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// get is ctx's incoming migration; made if create, else nil if none.
func (s *incomings) get(ctx context.Context, create bool) *incoming {
	key := incomingKey(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]*incoming{}
	}
	e := s.m[key]
	if e == nil && create {
		e = &incoming{key: key}
		s.m[key] = e
	}
	return e
}

// Reserve takes ctx's migration's ports from vmhopd.migration_ports
// (the same ones again if it holds them).
func (s *incomings) Reserve(ctx context.Context) (MigrationPorts, error) {
	e := s.get(ctx, true)
	p, err := s.w.ports.reserve(e.key)
	if err != nil {
		return p, err
	}
	e.mu.Lock()
	e.ports, e.reserved = p, true
	e.mu.Unlock()
	s.w.Log.Info("incoming migration: ports reserved", "migration", e.key, "memory", p.Memory, "nbd", p.NBD, "relay", p.Relay, "chunked", p.Chunked)
	return p, nil
}

// Release ends ctx's incoming migration here: its disk servers stop, a
// destination QEMU still waiting for the stream is stopped (one whose
// stream completed runs on: the VM is here), and its ports are free.
// Nothing to do for a migration this host does not know.
func (s *incomings) Release(ctx context.Context) error {
	e := s.get(ctx, false)
	if e == nil {
		return nil
	}
	e.mu.Lock()
	var err error
	if e.cur != nil && !e.landed {
		raw, qerr := e.cur.Query(ctx, qemu.Query{Command: "query-status"})
		var st struct {
			Status string `json:"status"`
		}
		if qerr != nil || json.Unmarshal(raw, &st) != nil || st.Status == "inmigrate" {
			err = e.cur.Stop(ctx)
			s.cleanup(ctx, e)
			s.w.Log.Info("incoming migration released before its VM ran here: destination QEMU, taps and secrets removed", "migration", e.key)
		} else {
			e.cur.Close()
		}
	} else if e.cur != nil {
		e.cur.Close()
	}
	e.cur = nil
	s.stopDisks(e)
	e.mu.Unlock()
	s.mu.Lock()
	if s.m[e.key] == e {
		delete(s.m, e.key)
	}
	s.mu.Unlock()
	if n := s.w.ports.release(e.key); n > 0 {
		s.w.Log.Info("incoming migration: ports released", "migration", e.key, "ports", n)
	}
	return err
}

// stopDisks stops the disk servers e started (under e.mu).
func (s *incomings) stopDisks(e *incoming) {
	for _, l := range e.listens {
		s.w.Disks.StopRelay(context.Background(), storage.RelayStop{Listen: l})
		s.w.Disks.StopChunked(context.Background(), storage.ChunkedStop{Listen: l})
	}
	e.listens = nil
}

// Start implements qemu.Incoming: it makes the taps, stores the PSK and
// starts QEMU, listening on the migration's reserved memory port (any
// other is refused); a second start of a migration under way is refused
// (CodeAlreadyExists), an existing tap too (never taken over).
func (s *incomings) Start(ctx context.Context, req qemu.IncomingStart) error {
	e := s.get(ctx, true)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cur != nil && !e.landed {
		return Errorf(CodeAlreadyExists, "incoming migration %s (%s) is under way on this host", e.key, e.name)
	}
	if !e.reserved || req.Listen.Port() != e.ports.Memory {
		return errPortNotReserved("the memory stream", req.Listen.Port(), e.ports, e.reserved)
	}
	if e.cur != nil {
		e.cur.Close() // a landed VM: its QEMU runs on; drop only our QMP connection
	}
	e.cur, e.name, e.taps, e.pskDir, e.landed = nil, req.Name, nil, "", false
	if req.PSK != nil {
		// The host's own place for secrets, never a path a peer chose.
		e.pskDir = filepath.Join(s.w.StateDir, "incoming", slotNameRE.ReplaceAllString(e.key, "_"))
		req.PSK.Dir = e.pskDir
	}
	if err := s.w.record(ctx, func(r *incomingRecord) {
		r.Name, r.PSKDir = req.Name, e.pskDir
		for _, t := range req.Taps {
			r.Taps = append(r.Taps, t.Name)
		}
	}); err != nil {
		return err
	}
	for _, t := range req.Taps {
		if err := makeTap(t); err != nil {
			s.cleanup(ctx, e)
			return fmt.Errorf("%s: %w", s.w.Host.Name, err)
		}
		e.taps = append(e.taps, t.Name)
	}
	// The relay ends' connections to this QEMU's NBD server close between
	// the export's deletion and the server's stop (LocalIncoming.CloseClients):
	// this migration's relays only.
	in := &qemu.LocalIncoming{Launcher: s.w.Launcher, CloseClients: func() {
		e.mu.Lock() // not held: UnexportDisk runs outside it
		listens := slices.Clone(e.listens)
		e.mu.Unlock()
		for _, l := range listens {
			s.w.Disks.StopRelay(context.Background(), storage.RelayStop{Listen: l})
		}
	}}
	if err := in.Start(ctx, req); err != nil {
		s.cleanup(ctx, e)
		return fmt.Errorf("%s: %w", s.w.Host.Name, err)
	}
	e.cur = in
	s.w.Log.Info("incoming migration: destination QEMU waits for the stream", "vm", req.Name, "migration", e.key, "listen", req.Listen, "taps", e.taps)
	return nil
}

// cleanup removes the taps and secrets made for e's migration (under e.mu).
func (s *incomings) cleanup(ctx context.Context, e *incoming) {
	for _, t := range e.taps {
		if err := removeTap(t); err != nil {
			s.w.Log.Warn("remove tap", "tap", t, "err", err)
		}
	}
	e.taps = nil
	if e.pskDir != "" {
		os.RemoveAll(e.pskDir)
		e.pskDir = ""
	}
	if err := s.w.record(ctx, func(r *incomingRecord) { r.PID, r.Taps, r.PSKDir = 0, nil, "" }); err != nil {
		s.w.Log.Error("incoming record", "err", err)
	}
}

// arriving says whether ctx's incoming migration has started here and
// its VM does not run here yet.
func (s *incomings) arriving(ctx context.Context) bool {
	e := s.get(ctx, false)
	if e == nil {
		return false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cur != nil && !e.landed
}

// current is ctx's incoming migration's QEMU, while its VM is on its way.
func (s *incomings) current(ctx context.Context) (*qemu.LocalIncoming, error) {
	e := s.get(ctx, false)
	if e != nil {
		e.mu.Lock()
		defer e.mu.Unlock()
	}
	if e == nil || e.cur == nil || e.landed {
		return nil, Errorf(CodeFailedPrecondition, "no incoming migration %s on this host", incomingKey(ctx))
	}
	return e.cur, nil
}

// Query implements qemu.Incoming.
func (s *incomings) Query(ctx context.Context, req qemu.Query) (json.RawMessage, error) {
	in, err := s.current(ctx)
	if err != nil {
		return nil, err
	}
	return in.Query(ctx, req)
}

// ExportDisk implements qemu.Incoming: on the migration's reserved NBD
// port only.
func (s *incomings) ExportDisk(ctx context.Context, req qemu.DiskExport) error {
	in, err := s.current(ctx)
	if err != nil {
		return err
	}
	var ports MigrationPorts
	ok := false
	if e := s.get(ctx, false); e != nil {
		e.mu.Lock()
		ports, ok = e.ports, e.reserved
		e.mu.Unlock()
	}
	if !ok || req.Listen.Port() != ports.NBD {
		return errPortNotReserved("the NBD server", req.Listen.Port(), ports, ok)
	}
	return in.ExportDisk(ctx, req)
}

// UnexportDisk implements qemu.Incoming (also once the VM runs here:
// then it is the migration's last use of the VM's QMP socket, which this
// host lets go of, since QEMU takes one QMP client at a time and the VM
// is its operator's now).
func (s *incomings) UnexportDisk(ctx context.Context) error {
	e := s.get(ctx, false)
	if e == nil {
		return nil
	}
	e.mu.Lock()
	in, landed := e.cur, e.landed
	e.mu.Unlock()
	if in == nil {
		return nil
	}
	err := in.UnexportDisk(ctx)
	if landed {
		e.mu.Lock()
		if e.cur == in {
			in.Close()
			e.cur = nil
		}
		e.mu.Unlock()
	}
	return err
}

// WaitRunning implements qemu.Incoming; once the guest runs here, the
// migration's secrets are gone (QEMU read its PSK at start) and its
// record is cleared: everything in it is the VM's now.
func (s *incomings) WaitRunning(ctx context.Context, req qemu.RunningWait) error {
	in, err := s.current(ctx)
	if err != nil {
		return err
	}
	if err := in.WaitRunning(ctx, req); err != nil {
		return err
	}
	e := s.get(ctx, false)
	if e == nil { // released meanwhile: nothing of it left to hold
		return nil
	}
	e.mu.Lock()
	e.landed, e.taps = true, nil // the taps are the VM's now
	if e.pskDir != "" {
		os.RemoveAll(e.pskDir)
		e.pskDir = ""
	}
	name := e.name
	e.mu.Unlock()
	if err := s.w.record(ctx, func(r *incomingRecord) { *r = incomingRecord{} }); err != nil {
		s.w.Log.Error("incoming record", "err", err)
	}
	s.w.Log.Info("incoming migration: the VM runs on this host", "vm", name, "migration", e.key)
	return nil
}

// Stop implements qemu.Incoming: QEMU quits (killed if it does not), its
// taps and secrets are removed. A VM that already runs here is not
// touched: Stop then only forgets it. The ports stay reserved until
// Release.
func (s *incomings) Stop(ctx context.Context) error {
	e := s.get(ctx, false)
	if e == nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cur == nil {
		return nil
	}
	var err error
	if !e.landed {
		err = e.cur.Stop(ctx)
		s.cleanup(ctx, e)
		s.w.Log.Info("incoming migration stopped: destination QEMU, taps and secrets removed", "vm", e.name, "migration", e.key)
	} else {
		e.cur.Close()
	}
	e.cur = nil
	return err
}

// Exited implements qemu.Incoming; incomings has many QEMUs: it is
// always nil, the peer API's watch uses exitedFor.
func (s *incomings) Exited() <-chan struct{} { return nil }

// exitedFor is closed when ctx's migration's destination QEMU exits (nil
// if it has none).
func (s *incomings) exitedFor(ctx context.Context) <-chan struct{} {
	e := s.get(ctx, false)
	if e == nil {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cur == nil {
		return nil
	}
	return e.cur.Exited()
}

// reservedDisks is the host's storage.DiskServer as peers call it: a
// disk stream's destination end listens only on a port its migration
// reserved (the relay's on Relay, its NBD target on NBD, the chunked
// engine's on Chunked), and is stopped when the migration is released.
type reservedDisks struct{ w *HostWork }

var (
	_ storage.DiskServer         = reservedDisks{}
	_ storage.RoundErrorReporter = reservedDisks{}
)

// allow checks listen's port against want(the migration's ports) and
// notes the listener for Release; it returns the migration's ports.
func (d reservedDisks) allow(ctx context.Context, what, listen string, want func(MigrationPorts) uint16) (MigrationPorts, error) {
	e := d.w.in.get(ctx, false)
	port := portOf(listen)
	if e == nil {
		return MigrationPorts{}, errPortNotReserved(what, port, MigrationPorts{}, false)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.reserved || port != want(e.ports) {
		return e.ports, errPortNotReserved(what, port, e.ports, e.reserved)
	}
	if !slices.Contains(e.listens, listen) {
		e.listens = append(e.listens, listen)
	}
	return e.ports, nil
}

func portOf(hostport string) uint16 {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return 0
	}
	return ap.Port()
}

func (d reservedDisks) ServeChunked(ctx context.Context, req storage.ChunkedServe) error {
	if _, err := d.allow(ctx, "the chunked engine", req.Listen, func(p MigrationPorts) uint16 { return p.Chunked }); err != nil {
		return err
	}
	return d.w.Disks.ServeChunked(ctx, req)
}

func (d reservedDisks) StopChunked(ctx context.Context, req storage.ChunkedStop) error {
	return d.w.Disks.StopChunked(ctx, req)
}

func (d reservedDisks) ServeRelay(ctx context.Context, req storage.RelayServe) error {
	ports, err := d.allow(ctx, "the disk relay", req.Listen, func(p MigrationPorts) uint16 { return p.Relay })
	if err != nil {
		return err
	}
	if portOf(req.NBD) != ports.NBD {
		return errPortNotReserved("the relay's NBD target", portOf(req.NBD), ports, true)
	}
	return d.w.Disks.ServeRelay(ctx, req)
}

func (d reservedDisks) StopRelay(ctx context.Context, req storage.RelayStop) error {
	return d.w.Disks.StopRelay(ctx, req)
}

func (d reservedDisks) ChunkedError(ctx context.Context, req storage.ChunkedStop) (storage.RoundError, error) {
	return d.w.Disks.ChunkedError(ctx, req)
}

// makeTap creates tap t (persistent, up, in its bridge). An existing
// link of that name is refused: it belongs to something else.
func makeTap(t qemu.Tap) error {
	if _, err := netlink.LinkByName(t.Name); err == nil {
		return fmt.Errorf("destination.tap %q exists on this host: refusing to take it over", t.Name)
	}
	link := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: t.Name}, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI}
	if err := netlink.LinkAdd(link); err != nil {
		return fmt.Errorf("destination.tap %q: create: %w", t.Name, err)
	}
	fail := func(err error) error {
		netlink.LinkDel(link)
		return err
	}
	if t.Bridge != "" {
		br, err := netlink.LinkByName(t.Bridge)
		if err != nil {
			return fail(fmt.Errorf("destination.bridge %q: %w", t.Bridge, err))
		}
		if err := netlink.LinkSetMaster(link, br); err != nil {
			return fail(fmt.Errorf("destination.tap %q: join bridge %q: %w", t.Name, t.Bridge, err))
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fail(fmt.Errorf("destination.tap %q: up: %w", t.Name, err))
	}
	return nil
}

func removeTap(name string) error {
	l, err := netlink.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return err
	}
	return netlink.LinkDel(l)
}

// ProcessLauncher starts programs as vmhopd's children in their own
// session, output to Dir/NAME.log. Under systemd ($INVOCATION_ID set) each
// goes into a scope of its own (systemd-run --scope, as libvirt puts
// VMs in machine scopes), so a VM that moved here is not in vmhopd's
// control group: stopping or restarting vmhopd leaves it running.
type ProcessLauncher struct {
	Dir     string
	OnStart func(ctx context.Context, pid int) // if set, called once the program runs (ctx: Launch's)
}

// scopeArgs wraps prog and args in systemd-run --scope when vmhopd runs
// under systemd; unchanged otherwise.
func scopeArgs(name, prog string, args []string) (string, []string) {
	if os.Getenv("INVOCATION_ID") == "" {
		return prog, args
	}
	unit := "vmhop-vm-" + slotNameRE.ReplaceAllString(name, "_")
	return "systemd-run", append([]string{"--scope", "--quiet", "--collect", "--unit=" + unit, "--", prog}, args...)
}

// Launch implements qemu.Launcher.
func (pl *ProcessLauncher) Launch(ctx context.Context, name, prog string, args []string) (qemu.Process, error) {
	if err := os.MkdirAll(pl.Dir, 0o700); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(filepath.Join(pl.Dir, slotNameRE.ReplaceAllString(name, "_")+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	prog, args = scopeArgs(name, prog, args)
	cmd := exec.Command(prog, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(p.exited) }()
	if pl.OnStart != nil {
		pl.OnStart(ctx, cmd.Process.Pid)
	}
	return p, nil
}

type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

func (p *process) Kill() error             { return p.cmd.Process.Kill() }
func (p *process) Exited() <-chan struct{} { return p.exited }
