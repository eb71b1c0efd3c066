package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

// HostWork is this host's own part of migrations, as vmhopd does it: the
// destination half other hosts' daemons call over the peer API
// (migrator.Destination, storage.DiskServer, qemu.Incoming) and the
// source half this host's own migrations use (migrator.SourceHost). One
// per vmhopd; everything it touches is on this host.
type HostWork struct {
	Host     *migrator.Host           // the datapath and the images
	Disks    *storage.LocalDiskServer // the destination ends of disk streams
	Launcher qemu.Launcher            // starts destination QEMUs; nil: a ProcessLauncher in StateDir/vms
	StateDir string                   // vmhopd.state_dir: incoming migrations' secrets go under it
	Log      *slog.Logger

	in    incomingSlot
	recMu sync.Mutex
	rec   incomingRecord
}

// Register serves w's destination half on a (before Serve).
func (w *HostWork) Register(a *PeerAPI) {
	if w.Launcher == nil {
		w.Launcher = &ProcessLauncher{Dir: filepath.Join(w.StateDir, "vms"), OnStart: func(pid int) {
			if err := w.record(func(r *incomingRecord) { r.PID = pid }); err != nil {
				w.Log.Error("record the destination QEMU", "pid", pid, "err", err)
			}
		}}
	}
	if w.Log == nil {
		w.Log = slog.Default()
	}
	w.in.w = w
	ServeDestination(a, recordingDest{w})
	ServeDiskServer(a, w.Disks)
	ServeIncoming(a, &w.in)
}

// incomingSlot is the host's qemu.Incoming over the peer API: one
// incoming migration at a time (the peer methods carry no migration
// identity, and the stream and NBD ports are fixed). It keeps the
// per-migration PSK under this host's state_dir, whatever directory the
// source names, and makes and removes the taps the destination QEMU
// uses. Once the VM runs here (WaitRunning succeeded) the slot lets go of
// it: the QEMU and its taps stay, and the next migration may start.
type incomingSlot struct {
	w *HostWork

	mu     sync.Mutex
	cur    *qemu.LocalIncoming
	name   string
	taps   []string // made for cur; removed by Stop
	pskDir string
	landed bool // cur's VM runs here: the slot is free
}

var _ qemu.Incoming = (*incomingSlot)(nil)

// slotNameRE is a QEMU -name as a path component.
var slotNameRE = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// Start implements qemu.Incoming: it makes the taps, stores the PSK and
// starts QEMU; a second incoming migration while one runs is refused
// (CodeAlreadyExists), an existing tap too (never taken over).
func (s *incomingSlot) Start(ctx context.Context, req qemu.IncomingStart) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != nil && !s.landed {
		return Errorf(CodeAlreadyExists, "an incoming migration (%s) is under way on this host", s.name)
	}
	if s.cur != nil {
		s.cur.Close() // a landed VM: its QEMU runs on; drop only our QMP connection
	}
	s.cur, s.name, s.taps, s.pskDir, s.landed = nil, req.Name, nil, "", false
	if req.PSK != nil {
		// The host's own place for secrets, never a path a peer chose.
		s.pskDir = filepath.Join(s.w.StateDir, "incoming", slotNameRE.ReplaceAllString(req.Name, "_"))
		req.PSK.Dir = s.pskDir
	}
	if err := s.w.record(func(r *incomingRecord) {
		r.Name, r.PSKDir = req.Name, s.pskDir
		for _, t := range req.Taps {
			r.Taps = append(r.Taps, t.Name)
		}
	}); err != nil {
		return err
	}
	for _, t := range req.Taps {
		if err := makeTap(t); err != nil {
			s.cleanup()
			return fmt.Errorf("%s: %w", s.w.Host.Name, err)
		}
		s.taps = append(s.taps, t.Name)
	}
	// The relay ends' connections to this QEMU's NBD server close between
	// the export's deletion and the server's stop (LocalIncoming.CloseClients).
	in := &qemu.LocalIncoming{Launcher: s.w.Launcher, CloseClients: s.w.Disks.StopRelays}
	if err := in.Start(ctx, req); err != nil {
		s.cleanup()
		return fmt.Errorf("%s: %w", s.w.Host.Name, err)
	}
	s.cur = in
	s.w.Log.Info("incoming migration: destination QEMU waits for the stream", "vm", req.Name, "listen", req.Listen, "taps", s.taps)
	return nil
}

// cleanup removes the taps and secrets made for the current migration.
func (s *incomingSlot) cleanup() {
	for _, t := range s.taps {
		if err := removeTap(t); err != nil {
			s.w.Log.Warn("remove tap", "tap", t, "err", err)
		}
	}
	s.taps = nil
	if s.pskDir != "" {
		os.RemoveAll(s.pskDir)
		s.pskDir = ""
	}
	if err := s.w.record(func(r *incomingRecord) { r.PID, r.Taps, r.PSKDir = 0, nil, "" }); err != nil {
		s.w.Log.Error("incoming record", "err", err)
	}
}

// arriving says whether an incoming migration has started here and its
// VM does not run here yet.
func (s *incomingSlot) arriving() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur != nil && !s.landed
}

func (s *incomingSlot) current() (*qemu.LocalIncoming, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil || s.landed {
		return nil, Errorf(CodeFailedPrecondition, "no incoming migration on this host")
	}
	return s.cur, nil
}

// Query implements qemu.Incoming.
func (s *incomingSlot) Query(ctx context.Context, req qemu.Query) (json.RawMessage, error) {
	in, err := s.current()
	if err != nil {
		return nil, err
	}
	return in.Query(ctx, req)
}

// ExportDisk implements qemu.Incoming.
func (s *incomingSlot) ExportDisk(ctx context.Context, req qemu.DiskExport) error {
	in, err := s.current()
	if err != nil {
		return err
	}
	return in.ExportDisk(ctx, req)
}

// UnexportDisk implements qemu.Incoming (also once the VM runs here:
// then it is the migration's last use of the VM's QMP socket, which this
// host lets go of, since QEMU takes one QMP client at a time and the VM
// is its operator's now).
func (s *incomingSlot) UnexportDisk(ctx context.Context) error {
	s.mu.Lock()
	in, landed := s.cur, s.landed
	s.mu.Unlock()
	if in == nil {
		return nil
	}
	err := in.UnexportDisk(ctx)
	if landed {
		s.mu.Lock()
		if s.cur == in {
			in.Close()
			s.cur = nil
		}
		s.mu.Unlock()
	}
	return err
}

// WaitRunning implements qemu.Incoming; once the guest runs here, the
// slot is free and the secrets are gone (QEMU read its PSK at start).
func (s *incomingSlot) WaitRunning(ctx context.Context, req qemu.RunningWait) error {
	in, err := s.current()
	if err != nil {
		return err
	}
	if err := in.WaitRunning(ctx, req); err != nil {
		return err
	}
	s.mu.Lock()
	s.landed, s.taps = true, nil // the taps are the VM's now
	if s.pskDir != "" {
		os.RemoveAll(s.pskDir)
		s.pskDir = ""
	}
	s.mu.Unlock()
	// Everything recorded belongs to the VM now, which runs here.
	if err := s.w.record(func(r *incomingRecord) { *r = incomingRecord{} }); err != nil {
		s.w.Log.Error("incoming record", "err", err)
	}
	s.w.Log.Info("incoming migration: the VM runs on this host", "vm", s.name)
	return nil
}

// Stop implements qemu.Incoming: QEMU quits (killed if it does not), its
// taps and secrets are removed. A VM that already runs here is not
// touched: Stop then only forgets it.
func (s *incomingSlot) Stop(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return nil
	}
	var err error
	if !s.landed {
		err = s.cur.Stop(ctx)
		s.cleanup()
		s.w.Log.Info("incoming migration stopped: destination QEMU, taps and secrets removed", "vm", s.name)
	} else {
		s.cur.Close()
	}
	s.cur = nil
	return err
}

// Exited implements qemu.Incoming.
func (s *incomingSlot) Exited() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return nil
	}
	return s.cur.Exited()
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
	OnStart func(pid int) // if set, called once the program runs
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
func (pl *ProcessLauncher) Launch(_ context.Context, name, prog string, args []string) (qemu.Process, error) {
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
		pl.OnStart(cmd.Process.Pid)
	}
	return p, nil
}

type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
}

func (p *process) Kill() error             { return p.cmd.Process.Kill() }
func (p *process) Exited() <-chan struct{} { return p.exited }
