package daemon

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/ddns"
)

// SourceMigrator's job control: the preflight alone (`vmhop migrate
// --dry-run`) and the plan recovery rebuilds from a journal record.

var (
	_ Preflighter     = (*SourceMigrator)(nil)
	_ RecoveryPlanner = (*SourceMigrator)(nil)
)

// PreflightReport is what SourceMigrator.Preflight found.
type PreflightReport struct {
	Peer         string             `json:"peer"`          // the destination's vmhopd, greeted (mutual TLS + hello)
	Preflight    migrator.Preflight `json:"preflight"`     // addresses on both hosts, DNS
	SourceDisk   string             `json:"source_disk"`   // the adopted VM's disk
	ImageBytes   int64              `json:"image_bytes"`   // its size
	AllocBytes   int64              `json:"alloc_bytes"`   // what the copy writes at the destination
	DiskStrategy string             `json:"disk_strategy"` // "qemu-mirror" or "chunked"
	VMMAC        string             `json:"vm_mac"`
	GatewayMAC   string             `json:"gateway_mac"`
	// DNSKeyProven: the primary accepted a signed UPDATE with only
	// prerequisites (ddns.Client.ProveKey): the flip's key works.
	DNSKeyProven bool `json:"dns_key_proven"`
	// DestFreeBytes is the free space where the destination image goes
	// (at least AllocBytes, or the preflight fails).
	DestFreeBytes int64 `json:"dest_free_bytes"`
	// SourceContinuity and DestContinuity are each host's loaded
	// mechanism for the VM's old flows ("ebpf" or "userspace"; the same
	// on both, or the preflight fails).
	SourceContinuity string `json:"source_continuity"`
	DestContinuity   string `json:"dest_continuity"`
}

// Preflight implements Preflighter: the plan Migrate would follow (the
// spec's hosts checked, the peer greeted, the running VM adopted through
// its QMP socket, the gateway's MAC, the TSIG key file read),
// migrator.Check (every address on both hosts, the DNS name) and the DNS
// key proven by a signed prerequisite-only UPDATE. Nothing is
// changed on either host: the migration's state directory the plan makes
// is removed again.
func (s *SourceMigrator) Preflight(ctx context.Context, job *Job) (any, error) {
	rep := &PreflightReport{}
	p, cleanup, err := s.Plan(ctx, job, s.D.log.With("preflight", job.ID))
	defer cleanup()
	if err != nil {
		return rep, err
	}
	rep.Peer, rep.SourceDisk, rep.DiskStrategy = p.Label, p.SourceDisk, p.Disk.Name()
	rep.VMMAC, rep.GatewayMAC = p.VMMAC.String(), p.GatewayMAC.String()
	img, err := p.Source.StatImage(ctx, migrator.ImageRef{Path: p.SourceDisk})
	if err != nil {
		return rep, fmt.Errorf("preflight: %w", err)
	}
	rep.ImageBytes, rep.AllocBytes = img.Size, img.Allocated
	if rep.Preflight, err = migrator.Check(ctx, p); err != nil {
		return rep, err
	}
	if err := hostsReady(ctx, p, rep); err != nil {
		return rep, err
	}
	if c, ok := p.DNS.(*ddns.Client); ok {
		if err := c.ProveKey(ctx, p.Zone, p.DNSName); err != nil {
			return rep, fmt.Errorf("preflight: dns key (migration.dns.tsig_key_file): %w", err)
		}
		rep.DNSKeyProven = true
	}
	return rep, nil
}

// RecoveryPlan implements RecoveryPlanner: the plan from the record's
// spec, as Migrate builds it; if the VM cannot be adopted again (its
// source QEMU quit: the record is past the commit point, or before it
// the QEMU is gone for good, qemu.Gone), a plan with what recovery's
// actions need: this host's work, the peer's, a QEMU driver on the
// source's QMP socket, DNS, and the MACs the journal kept. Before the
// commit point a source that is only unreachable (or any other failure)
// is an error: the recovery is retried.
func (s *SourceMigrator) RecoveryPlan(ctx context.Context, rec *journal.Record) (*migrator.Plan, func(), error) {
	f, err := config.Parse([]byte(rec.Spec))
	if err != nil || f.Migration == nil {
		return nil, nil, fmt.Errorf("journal %s: its spec does not parse: %v", rec.ID, err)
	}
	job := &Job{ID: rec.ID, Spec: f.Migration, Daemon: s.D, Caller: Caller{UID: -1, GID: -1}}
	log := s.D.log.With("recover", rec.ID)
	p, cleanup, err := s.Plan(ctx, job, log)
	if err == nil {
		return p, cleanup, nil
	}
	cleanup()
	if !rec.Done.Committed {
		// Before the commit point the source VM must be there to resume,
		// unless it is gone for good: then journal.Recover rolls back
		// without it and closes the record.
		gone, why := qemu.Gone(f.Migration.VM.QMPSocket)
		if !gone {
			return nil, nil, err
		}
		log.Warn("recover: the source VM is gone; a plan from the journal to roll back without it", "why", why, "err", err)
		return s.journalPlan(ctx, rec, f.Migration)
	}
	log.Warn("recover: the VM cannot be adopted again; a plan from the journal", "err", err)
	return s.journalPlan(ctx, rec, f.Migration)
}

// journalPlan is a plan for a migration whose source VM is gone: enough
// for the forward actions (DNS, stop the source, drain) past the commit
// point, and before it for the roll back without the source (disk
// stream, destination, DNS TTL, redirect, tunnels).
func (s *SourceMigrator) journalPlan(ctx context.Context, rec *journal.Record, spec *config.Migration) (*migrator.Plan, func(), error) {
	cfg := s.D.Config()
	peerName := ""
	for _, pc := range cfg.Peers {
		if pc.Address == spec.Destination.Daemon {
			peerName = pc.Name
		}
	}
	peer, err := s.D.Peer(peerName)
	if err != nil {
		return nil, nil, fmt.Errorf("migration.destination.daemon %q: %w", spec.Destination.Daemon, err)
	}
	vmMAC, err := net.ParseMAC(rec.VMMAC)
	if err != nil {
		return nil, nil, fmt.Errorf("journal %s: vm_mac %q: %w", rec.ID, rec.VMMAC, err)
	}
	gwMAC, err := net.ParseMAC(rec.GatewayMAC)
	if err != nil {
		if gwMAC, err = neighbourMAC(ctx, spec.Network.Gateway); err != nil {
			return nil, nil, fmt.Errorf("migration.network.gateway %s: %w", spec.Network.Gateway, err)
		}
	}
	in := &RemoteIncoming{Peer: peer.ForMigration(rec.ID)}
	// The migration's ports: the ones the destination still holds for
	// it (reserve is idempotent), or new ones if it restarted since
	// (then nothing of the migration listens there any more).
	// Unreachable: the forward actions left may still work; a disk end
	// at the destination is then stopped by its release or its lease.
	ports, err := in.Reserve(ctx)
	if err != nil {
		s.D.log.Warn("recover: the migration's ports at the destination are unknown", "id", rec.ID, "peer", peerName, "err", err)
	}
	release := func() {
		in.Close()
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		in.Release(rctx)
	}
	drv := qemu.New(qemu.Config{SourceQMP: spec.VM.QMPSocket, Incoming: in})
	// The disk stream's ends at the destination (end-disk-stream, if
	// disk-release did not end): its export and the relay or chunked end.
	var disk storage.Strategy = &qemu.MirrorDisk{Driver: drv, Relay: &storage.Relay{Server: RemoteDiskServer{Peer: in.Peer},
		DestWAN: netip.AddrPortFrom(spec.Destination.Address, ports.Relay).String()}}
	if spec.Storage.Mode == "chunked" {
		disk = &storage.Chunked{Sync: &storage.ChunkedSync{Server: RemoteDiskServer{Peer: in.Peer},
			DestWAN: netip.AddrPortFrom(spec.Destination.Address, ports.Chunked).String()}}
	}
	// The same mapping as the migration's (SpecPlan): a dual-stack VM's
	// IPv6 redirect and AAAA record are undone or finished too.
	plan := SpecPlan(spec)
	p := &plan
	p.Label, p.VM, p.SourceQMP, p.Log = peerName, spec.VM.QMPSocket, spec.VM.QMPSocket, s.D.log.With("recover", rec.ID)
	p.Source, p.Dest, p.SourceWAN, p.DestWAN = s.Work.Host, RemoteDestination{Peer: in.Peer}, spec.Source.Address, spec.Destination.Address
	p.Driver, p.Disk, p.SourceDisk, p.DestDisk, p.DestTap = drv, disk, spec.VM.Disk, spec.Destination.Disk, spec.Destination.Tap
	p.VMMAC, p.GatewayMAC = vmMAC, gwMAC
	if k, err := ddns.LoadKey(spec.DNS.TSIGKeyFile); err == nil {
		p.DNS = &ddns.Client{Server: spec.DNS.Server, Key: k, Timeout: spec.DNS.Timeout}
	} else {
		release()
		return nil, nil, fmt.Errorf("migration.dns.tsig_key_file: %w", err)
	}
	return p, release, nil
}

// hostsReady is the preflight's look at both hosts beyond addresses:
// each has its continuity mechanism loaded, the same one (a userspace
// host cannot take an eBPF tunnel), and the destination has room for the
// image (the source's allocated bytes, as CreateImage will demand).
func hostsReady(ctx context.Context, p *migrator.Plan, rep *PreflightReport) error {
	src, err := p.Source.HeldAddrs(ctx, migrator.AddrQuery{})
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	dst, err := p.Dest.HeldAddrs(ctx, migrator.AddrQuery{ImageDir: filepath.Dir(p.DestDisk)})
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	rep.SourceContinuity, rep.DestContinuity, rep.DestFreeBytes = src.Continuity, dst.Continuity, dst.FreeBytes
	for _, h := range []migrator.HeldAddrs{src, dst} {
		if h.Continuity == "" {
			return fmt.Errorf("preflight: %s has neither its eBPF datapath loaded nor the userspace fallback (vmhopd.datapath): the VM's old flows would have no path", h.Name)
		}
	}
	if src.Continuity != dst.Continuity {
		return fmt.Errorf("preflight: %s runs the %s datapath, %s the %s one: both hosts need the same (vmhopd.datapath)", src.Name, src.Continuity, dst.Name, dst.Continuity)
	}
	need := rep.AllocBytes
	if need <= 0 {
		need = rep.ImageBytes
	}
	if dst.FreeBytes < need {
		return fmt.Errorf("preflight: %s: %w: the image %s needs %d MiB, %s has %d MiB free", dst.Name, storage.ErrNoSpace,
			p.DestDisk, (need+1<<20-1)>>20, filepath.Dir(p.DestDisk), dst.FreeBytes>>20)
	}
	return nil
}
