package daemon

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/ddns"
)

// PhaseDrain is the phase of the event a job emits once the VM runs at
// the destination: its Data is the JobReport so far; the job ends when
// the redirect has drained.
const PhaseDrain = "drain"

// SourceMigrator is vmhopd's Migrator: it runs a spec's migration from
// this host (the source) to the peer the spec names, with migrator.Run:
// this host's own work through Work, the destination's through the peer
// API (RemoteDestination, RemoteIncoming, RemoteDiskServer). After the
// move it drains the redirect, so a job ends when nothing of the
// migration is left on either host.
type SourceMigrator struct {
	D    *Daemon
	Work *HostWork
}

var _ Migrator = (*SourceMigrator)(nil)

// JobReport is what a migration job reports (Result.Report): the
// migration core's report, the preflight, and the drain.
type JobReport struct {
	Peer      string             `json:"peer"` // the destination's vmhopd (its certificate name)
	Preflight migrator.Preflight `json:"preflight"`
	Migration migrator.Report    `json:"migration"`
	// DrainedMS is how long the redirect stayed after the move, in
	// milliseconds (0 if the migration did not get that far).
	DrainedMS int64 `json:"drained_ms"`
}

// Migrate implements Migrator.
func (s *SourceMigrator) Migrate(ctx context.Context, job *Job) (any, error) {
	rep := &JobReport{}
	log := newEventLogger(job, s.D.log.Handler())
	p, cleanup, err := s.Plan(ctx, job, log)
	defer cleanup()
	if err != nil {
		return rep, err
	}
	rep.Peer = p.Label
	if rep.Preflight, err = migrator.Check(ctx, p); err != nil {
		return rep, err
	}
	log.Info("preflight passed", "dns_wait", rep.Preflight.DNSWait, "cached_after_flip", rep.Preflight.DNSCachedFor)
	// The journal (each phase, before it acts), progress events, abort.
	stop := job.Attach(p)
	defer stop()
	rep.Migration, err = migrator.Run(ctx, p)
	if err != nil {
		return rep, err
	}
	b, _ := json.Marshal(rep)
	job.Emit(Event{Phase: PhaseDrain, Message: fmt.Sprintf("moved; the redirect stays until the old flows drain (idle %s, at most %s)", p.DrainIdle, p.DrainTimeout), Data: b})
	drained, err := migrator.Drain(ctx, p)
	rep.DrainedMS = drained.Milliseconds()
	if err != nil {
		return rep, fmt.Errorf("%w: drain: %w", migrator.ErrFollowUp, err)
	}
	log.Info("redirect drained", "after", drained.Round(time.Millisecond))
	return rep, nil
}

// Plan turns job's spec into the plan migrator.Run follows, checking
// that the spec's source is this host and its destination one of this
// host's peers (errors name the spec's key: CodeInvalidArgument). The
// VM is adopted as it runs (its QEMU's command line, read through its
// QMP socket), with the destination's paths and tap from the spec.
// cleanup removes the migration's files on this host; call it always.
func (s *SourceMigrator) Plan(ctx context.Context, job *Job, log *slog.Logger) (p *migrator.Plan, cleanup func(), err error) {
	spec, cfg := job.Spec, s.D.Config()
	var closers []func()
	cleanup = func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	if spec.Source.Address != cfg.Address {
		return nil, cleanup, Errorf(CodeInvalidArgument, "migration.source.address %s is not this host's (vmhopd.address %s): give the spec to the source host's vmhopd", spec.Source.Address, cfg.Address)
	}
	if _, lport, _ := net.SplitHostPort(cfg.Listen); !strings.HasSuffix(spec.Source.Daemon, ":"+lport) {
		return nil, cleanup, Errorf(CodeInvalidArgument, "migration.source.daemon %q is not this vmhopd (vmhopd.listen %s)", spec.Source.Daemon, cfg.Listen)
	}
	peerName := ""
	var names []string
	for _, pc := range cfg.Peers {
		names = append(names, pc.Name+"="+pc.Address)
		if pc.Address == spec.Destination.Daemon {
			peerName = pc.Name
		}
	}
	if peerName == "" {
		return nil, cleanup, Errorf(CodeInvalidArgument, "migration.destination.daemon %q is none of vmhopd.peers (%s)", spec.Destination.Daemon, strings.Join(names, ", "))
	}
	peer, err := s.D.Peer(peerName)
	if err != nil {
		return nil, cleanup, err
	}
	if _, err := peer.Hello(ctx, s.D.hello()); err != nil {
		return nil, cleanup, fmt.Errorf("peer %s (migration.destination.daemon %s): %w", peerName, spec.Destination.Daemon, err)
	}
	if spec.VM.Hypervisor != "qemu" {
		return nil, cleanup, Errorf(CodeInvalidArgument, "migration.vm.hypervisor %q: vmhopd runs QEMU migrations between hosts; VirtualBox runs through the same core in process only (migrator/virtualbox_test.go)", spec.VM.Hypervisor)
	}

	dir := filepath.Join(cfg.StateDir, "migrations", job.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, cleanup, fmt.Errorf("vmhopd.state_dir: %w", err)
	}
	closers = append(closers, func() { os.RemoveAll(dir) })

	destQMP := spec.Destination.QMPSocket
	if destQMP == "" {
		destQMP = spec.VM.QMPSocket
	}
	base := strings.TrimSuffix(destQMP, filepath.Ext(destQMP))
	destName := spec.VM.Name + "@" + peerName
	adopted, err := qemu.Adopt(spec.VM.QMPSocket, qemu.HostMap{
		Disks: map[string]string{spec.VM.Disk: spec.Destination.Disk}, Taps: map[string]string{"": spec.Destination.Tap},
		Bridge: spec.Destination.Bridge, QMPSocket: destQMP, PidFile: base + ".pid", Console: base + ".console", Name: destName,
	})
	if err != nil {
		return nil, cleanup, fmt.Errorf("migration.vm.qmp_socket %s: %w", spec.VM.QMPSocket, err)
	}
	if len(adopted.MACs) != 1 {
		return nil, cleanup, fmt.Errorf("migration.vm: the VM has NICs %v; vmhop moves a VM with one", adopted.MACs)
	}
	vmMAC, err := net.ParseMAC(adopted.MACs[0])
	if err != nil {
		return nil, cleanup, fmt.Errorf("the VM's MAC %q: %w", adopted.MACs[0], err)
	}
	gwMAC, err := neighbourMAC(ctx, spec.Network.Gateway)
	if err != nil {
		return nil, cleanup, fmt.Errorf("migration.network.gateway %s: %w", spec.Network.Gateway, err)
	}

	// The destination's ports for this migration, from its
	// vmhopd.migration_ports: every call of the migration names it, so
	// the destination keeps it apart from others it serves at once.
	in := &RemoteIncoming{Peer: peer.ForMigration(job.ID)}
	ports, err := in.Reserve(ctx)
	if err != nil {
		return nil, cleanup, fmt.Errorf("peer %s: reserve the migration's ports: %w", peerName, err)
	}
	closers = append(closers, func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := in.Release(rctx); err != nil {
			s.D.log.Warn("release the migration's ports at the destination (its lease frees them)", "migration", job.ID, "peer", peerName, "err", err)
		}
	})
	closers = append(closers, in.Close)
	log.Info("destination ports reserved", "peer", peerName, "memory", ports.Memory, "nbd", ports.NBD, "relay", ports.Relay, "chunked", ports.Chunked)
	key := make([]byte, 32)
	rand.Read(key)
	drv := qemu.New(qemu.Config{
		SourceQMP:  spec.VM.QMPSocket,
		Dest:       qemu.Machine{Name: destName, QMPSocket: destQMP},
		DestArgs:   adopted.Args,
		DestListen: netip.AddrPortFrom(spec.Destination.Address, ports.Memory),
		Dial:       (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		Tuning:     SpecTuning(spec),
		DestTaps:   []qemu.Tap{{Name: spec.Destination.Tap, Bridge: spec.Destination.Bridge}},
		Incoming:   in,
		// A fresh key per migration, handed over inside the start request
		// (the peer API's mutual TLS); each host keeps it 0600 under its
		// state_dir until the stream is done.
		TLS: &qemu.PSK{Username: "vmhop", Key: key, SourceDir: filepath.Join(dir, "psk")},
	})
	// Each end of a disk stream proves its own host identity: A with its
	// certificate, B with its own, each checked for the other's name.
	_, streamTLS, err := s.D.StreamTLS(peerName)
	if err != nil {
		return nil, cleanup, err
	}
	// The source's QMP socket takes one client at a time: let go of it
	// when the job ends, whatever the outcome.
	closers = append(closers, func() { drv.Close() })
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	dest := RemoteDestination{Peer: in.Peer}
	disks := RemoteDiskServer{Peer: in.Peer}
	plan := SpecPlan(spec)
	p = &plan
	p.Label, p.VM, p.SourceQMP, p.Log = peerName, spec.VM.QMPSocket, spec.VM.QMPSocket, log
	p.Source, p.Dest, p.SourceWAN, p.DestWAN = s.Work.Host, dest, spec.Source.Address, spec.Destination.Address
	p.Driver, p.SourceDisk, p.DestDisk, p.DestTap = drv, adopted.Disks[0], spec.Destination.Disk, spec.Destination.Tap
	p.VMMAC, p.GatewayMAC = vmMAC, gwMAC
	p.Disk = &qemu.MirrorDisk{
		Driver:    drv,
		NBDListen: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ports.NBD),
		Relay: &storage.Relay{
			DialSource: dialer.DialContext,
			TLS:        streamTLS,
			Server:     disks,
			DestWAN:    netip.AddrPortFrom(spec.Destination.Address, ports.Relay).String(),
			DestNBD:    netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ports.NBD).String(),
			SourceSock: filepath.Join(dir, "nbd.sock"),
			Tuning:     SpecTuning(spec),
		},
		Log: log,
	}
	if len(adopted.Disks) != 1 {
		return nil, cleanup, fmt.Errorf("migration.vm: the VM has disks %v; vmhop moves a VM with one", adopted.Disks)
	}
	if adopted.Disks[0] != spec.VM.Disk {
		return nil, cleanup, Errorf(CodeInvalidArgument, "migration.vm.disk %s is not the VM's disk (its QEMU has %s)", spec.VM.Disk, adopted.Disks[0])
	}
	if spec.Storage.Mode == "chunked" {
		p.Disk = &storage.Chunked{Sync: &storage.ChunkedSync{
			Source:     storage.ChunkedSource{Path: spec.VM.Disk, Chunk: int(spec.Storage.ChunkSize), Compress: true},
			Dest:       storage.ChunkedDest{Path: spec.Destination.Disk},
			Server:     disks,
			DialSource: dialer.DialContext,
			TLS:        streamTLS,
			DestWAN:    netip.AddrPortFrom(spec.Destination.Address, ports.Chunked).String(),
			Tuning:     SpecTuning(spec),
			FinalDelta: int64(spec.Storage.FinalDelta), MaxRounds: spec.Storage.MaxRounds,
			Log: log,
		}}
	}
	k, err := ddns.LoadKey(spec.DNS.TSIGKeyFile)
	if err != nil {
		return nil, cleanup, Errorf(CodeInvalidArgument, "migration.dns.tsig_key_file: %v", err)
	}
	p.DNS = &ddns.Client{Server: spec.DNS.Server, Key: k, Timeout: spec.DNS.Timeout}
	return p, cleanup, nil
}

// neighbourMAC is the link-layer address this host's neighbour table has
// for ip (the VM's gateway: the destination answers for it with this
// MAC, so the guest's cached entry stays right). It prods the neighbour
// with a datagram if the table has no usable entry, for up to 3 s.
func neighbourMAC(ctx context.Context, ip netip.Addr) (net.HardwareAddr, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		neighs, err := netlink.NeighList(0, netlink.FAMILY_V4)
		if err != nil {
			return nil, fmt.Errorf("neighbour table: %w", err)
		}
		for _, n := range neighs {
			usable := n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE|netlink.NUD_PERMANENT) != 0
			if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip && usable && len(n.HardwareAddr) == 6 {
				return n.HardwareAddr, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, errors.New("not in this host's neighbour table (is it on the source host's network?)")
		}
		if c, err := net.Dial("udp", netip.AddrPortFrom(ip, 9).String()); err == nil { // discard: only the ARP matters
			c.Write([]byte{0})
			c.Close()
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// eventHandler publishes a migration's log records as its progress
// events (the CLI shows them), each with the phase running (the core logs
// "phase name=X" as one starts), and passes them on to the daemon's log.
type eventHandler struct {
	job   *Job
	next  slog.Handler
	attrs []slog.Attr
	phase *phaseName
}

type phaseName struct {
	mu   sync.Mutex
	name string
}

func newEventLogger(job *Job, next slog.Handler) *slog.Logger {
	return slog.New(&eventHandler{job: job, next: next, phase: &phaseName{}}).With("migration", job.ID)
}

func (h *eventHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || h.next.Enabled(ctx, l)
}

func (h *eventHandler) Handle(ctx context.Context, r slog.Record) error {
	// The core's own "phase" / "phase failed" lines are the phase events
	// Job.Attach emits already (OnPhase): only track the phase from them.
	if r.Level >= slog.LevelInfo && (r.Message == "phase" || r.Message == "phase failed") {
		r.Attrs(func(a slog.Attr) bool {
			if r.Message == "phase" && a.Key == "name" {
				h.phase.mu.Lock()
				h.phase.name = a.Value.String()
				h.phase.mu.Unlock()
			}
			return true
		})
	} else if r.Level >= slog.LevelInfo {
		var b strings.Builder
		b.WriteString(r.Message)
		add := func(a slog.Attr) bool {
			if a.Key == "migration" {
				return true
			}
			fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
			return true
		}
		for _, a := range h.attrs {
			add(a)
		}
		r.Attrs(add)
		h.phase.mu.Lock()
		phase := h.phase.name
		h.phase.mu.Unlock()
		h.job.Emit(Event{Time: r.Time, Phase: phase, Message: b.String()})
	}
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}

func (h *eventHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &eventHandler{job: h.job, next: h.next.WithAttrs(as), attrs: append(append([]slog.Attr{}, h.attrs...), as...), phase: h.phase}
}

func (h *eventHandler) WithGroup(name string) slog.Handler {
	return &eventHandler{job: h.job, next: h.next.WithGroup(name), attrs: h.attrs, phase: h.phase}
}
