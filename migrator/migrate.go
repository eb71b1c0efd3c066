// Package migrator moves a running VM between sites: runtime state by the
// hypervisor's live migration, the disk by a staged mirror verified by
// digest, and the network by the datapath's redirect and a DNS flip. Run
// goes through named phases; whatever fails before the destination
// resumes is undone: the VM keeps running on the source, its disk intact,
// DNS as it was.
package migrator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/ddns"
	"golang.org/x/time/rate"
)

// Plan is one migration of one VM, whatever its hypervisor.
type Plan struct {
	Label string // for logs
	// VM identifies the VM (its name): a second migration of the same VM
	// is refused while one runs (ErrInProgress).
	VM string
	// Source and Dest do each host's own work (in one process: *Host;
	// between daemons: the peer API). SourceWAN and DestWAN are their WAN
	// addresses (tunnel endpoints).
	Source             SourceHost
	Dest               Destination
	SourceWAN, DestWAN netip.Addr
	// Driver moves the VM's runtime state (qemu.Driver, virtualbox.Driver).
	Driver hypervisor.Driver
	// Disk moves the VM's disk (qemu.MirrorDisk, storage.Chunked).
	Disk       storage.Strategy
	SourceDisk string // the source image, on the source host
	DestDisk   string // the destination image (created empty, same size, by Dest)
	DestTap    string // the destination VM's tap on Dest
	// Limits.Bandwidth is the whole migration's budget: the disk stream
	// takes from it, the memory stream gets what the disk leaves. Run is
	// its only owner.
	Limits hypervisor.Options

	OldIP, NewIP, Gateway netip.Addr
	// OldIP6, NewIP6, Gateway6 are a dual-stack VM's IPv6 side (all
	// invalid for an IPv4-only VM): the DNS flip replaces A and AAAA
	// together, from OldAddrs to NewAddrs.
	OldIP6, NewIP6, Gateway6 netip.Addr
	VMMAC, GatewayMAC        net.HardwareAddr

	DNS           DNSUpdater // nil: no DNS flip (a *ddns.Client)
	Zone, DNSName string
	TTL           uint32 // low TTL for prepare and flip, in seconds

	DrainIdle, DrainTimeout time.Duration

	// NoRedirect leaves the redirect off at the switch: the VM moves and
	// DNS flips, but packets for the old address keep going to the source,
	// where nothing answers them (connections open at the move are lost).
	// The spec's network.redirect: false (services whose clients reconnect
	// by name; the benchmark's "DNS only" mode measures what the redirect
	// is worth).
	NoRedirect bool

	// Health, if enabled, must pass after the destination resumes; until
	// it does, the source VM is kept (paused), DNS is not flipped. A check
	// that fails makes Run return an error wrapping ErrUnhealthy.
	Health *HealthCheck
	// SourceQMP names the source's QMP socket in the fallback advice of an
	// ErrUnhealthy error.
	SourceQMP string

	// dnsCachedUntil is set by the flip: until then resolvers may still
	// hand out the old address, so Drain keeps the redirect at least that long.
	dnsCachedUntil time.Time

	Log *slog.Logger
	// Progress, if set, gets memory-migration progress.
	Progress chan<- hypervisor.Progress
	// DiskProgress, if set, gets each report of the disk's bulk copy
	// (called from the copy's goroutine: it must not block).
	DiskProgress func(storage.BulkProgress)
	// OnSwitch, if set, runs in the switchover hook before the disk's final
	// step: the source is paused, the redirect on, the destination not yet
	// running (tests send packets here that must wait in the destination's
	// tap, or damage the destination disk to see the migration refuse it).
	OnSwitch func(context.Context) error
	// OnResumed, if set, runs once the VM runs at the destination, before
	// the health check (tests stop the guest here).
	OnResumed func(context.Context) error

	// OnPhase, if set, is called before each phase starts and after it
	// ends (PhaseEvent), Drain's included: vmhopd's journal writes each
	// transition durably here. An error before a phase keeps the phase
	// from acting; an error after one fails it (Run then undoes, or after
	// the commit point reports a follow-up failure). dns-prepare runs
	// beside the disk phases: calls may come from two goroutines at once.
	OnPhase func(ctx context.Context, ev PhaseEvent) error
	// StallTimeout aborts the memory stream (the source resumes, Run
	// undoes) when the hypervisor reports no progress for this long
	// outside the switchover hook: a cut WAN in pre-copy or in the device
	// phase. 0 means DefaultStallTimeout; < 0 never. Armed by the
	// driver's first progress report; only drivers whose reports carry
	// the bytes sent (hypervisor.ByteReporter: QEMU) are watched.
	StallTimeout time.Duration

	// Token is the migration's tunnel token (datapath.Tunnel): 0 makes
	// Run draw one before the datapath phase (the journal records it
	// then); Drain retires it. Recovery sets the journal's.
	Token uint64
	// srcEnd, dstEnd are the hosts' ends of the tunnel, as their prepare
	// calls answered them (mode; userspace: WireGuard key and port).
	srcEnd, dstEnd TunnelEnd
}

// OldAddrs is the VM's addresses at the source site: OldIP, and OldIP6
// when set; what the DNS name holds before the flip.
func (p *Plan) OldAddrs() []netip.Addr { return validAddrs(p.OldIP, p.OldIP6) }

// NewAddrs is the VM's addresses at the destination site: NewIP, and
// NewIP6 when set; what the DNS name holds after the flip.
func (p *Plan) NewAddrs() []netip.Addr { return validAddrs(p.NewIP, p.NewIP6) }

func validAddrs(as ...netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range as {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// tunnel is this migration's tunnel towards the host at peer (a WAN
// address): the source's end when peer is SourceWAN, else the
// destination's.
func (p *Plan) tunnel(peer netip.Addr) Tunnel {
	end := p.dstEnd
	if peer == p.SourceWAN {
		end = p.srcEnd
	}
	return Tunnel{Peer: peer, Token: p.Token, Continuity: end.Continuity, Key: end.Key, Port: end.Port}
}

// DNSUpdater changes the VM's name's address records (RFC 2136 updates;
// *ddns.Client implements it): Show reads them (the preflight), Prepare
// lowers the TTL, Flip replaces the
// old address by the new one, Restore puts the TTL back after a failure.
type DNSUpdater interface {
	Show(ctx context.Context, zone, name string) (ddns.State, error)
	Prepare(ctx context.Context, zone, name string, ttl uint32) (ddns.Result, error)
	Flip(ctx context.Context, zone, name string, old, new []netip.Addr, ttl uint32) (ddns.Result, error)
	Restore(ctx context.Context, zone, name string, ttl uint32) (ddns.Result, error)
}

var _ DNSUpdater = (*ddns.Client)(nil)

// ErrUndo wraps what could not be undone after a failure before the
// commit point (a host or DNS unreachable): the journal keeps such a
// migration open, so recovery tries the undo again.
var ErrUndo = errors.New("undo")

// ErrInProgress refuses a migration of a VM that is already migrating.
var ErrInProgress = errors.New("a migration of this vm is already running")

// Report is what a migration did, phase by phase.
type Report struct {
	Phases       []Phase
	Runtime      hypervisor.Result
	DiskStrategy string // the storage.Strategy's name
	DiskBytes    uint64 // copied by the bulk copy (a mirror counts holes)
	DiskWire     int64  // bytes the disk stream sent to the destination (0: not counted)
	DiskRounds   int    // chunked engine: rounds completed, the final one included
	DiskCuts     int    // WAN connections that broke and were resumed
	DigestMatch  bool
	Digest       string
	DigestRead   int64         // bytes hashed before the pause (holes are free)
	VerifyRead   int64         // bytes hashed inside the pause
	VerifyChunks int           // chunks re-hashed (or sent, chunked) inside the pause (0: whole images)
	Pause        time.Duration // source paused to destination running: the hypervisor's downtime
	Total        time.Duration
	Redirected   datapath.Counters // old host's counters for the old address at the end
	DNSBefore    []ddns.Record
	DNSAfter     []ddns.Record // after the flip, and the TTL's restore
	DNSWait      time.Duration // waited after prepare: the old TTL, in full
	DNSCachedFor time.Duration // after the flip, resolvers may hold the old address this long
	// Health is the post-resume check's outcome: "none", "passed after
	// 1.2s (tcp 10.2.0.10:7)", or the failure.
	Health string
	// Warnings are the preflight's: the migration ran despite them.
	Warnings []string `json:",omitempty"`
	// SourceKept: the source VM was kept paused because the destination
	// failed its health check (see Fallback).
	SourceKept bool
}

// Phase is a named step and how long it took.
type Phase struct {
	Name     string
	Duration time.Duration
	Err      string `json:",omitempty"`
}

type run struct {
	p           *Plan
	tracked     bool // both images hashed after the bulk copy; the pause re-hashes written chunks
	rep         Report
	mu          sync.Mutex                    // undo and rep.Phases: dns-prepare adds to them beside the disk phases
	undo        []func(context.Context) error // LIFO, run on failure
	dnsPre      *ddns.Result
	dnsPreAt    time.Time     // when prepare lowered the TTL
	diskLimit   *rate.Limiter // the disk stream's share of Limits.Bandwidth
	committed   bool          // the VM runs at the destination (guarded by mu)
	dnsShownTTL uint32        // the record's TTL read before dns-prepare (guarded by mu)
}

func (r *run) step(ctx context.Context, name string, fn func(context.Context) error) error {
	t0 := time.Now()
	r.p.Log.Info("phase", "name", name)
	err := r.hook(ctx, name, false, nil, 0)
	if err == nil {
		err = fn(ctx)
		if herr := r.hook(ctx, name, true, err, time.Since(t0)); err == nil {
			err = herr
		}
	}
	ph := Phase{Name: name, Duration: time.Since(t0)}
	if err != nil {
		ph.Err = err.Error()
		r.p.Log.Error("phase failed", "name", name, "err", err)
	}
	r.mu.Lock()
	r.rep.Phases = append(r.rep.Phases, ph)
	r.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

func (r *run) onFailure(f func(context.Context) error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.undo = append(r.undo, f)
}

// check refuses a plan that misses what every migration needs, naming
// the field.
func (p *Plan) check() error {
	var missing []string
	for _, f := range []struct {
		name  string
		unset bool
	}{{"VM", p.VM == ""}, {"Source", p.Source == nil}, {"Dest", p.Dest == nil}, {"Driver", p.Driver == nil},
		{"Disk", p.Disk == nil}, {"SourceDisk", p.SourceDisk == ""}, {"DestDisk", p.DestDisk == ""},
		{"SourceWAN", !p.SourceWAN.IsValid()}, {"DestWAN", !p.DestWAN.IsValid()}, {"OldIP", !p.OldIP.IsValid()},
		{"VMMAC", len(p.VMMAC) != 6}} {
		if f.unset {
			missing = append(missing, f.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("migrate: plan %q: missing %s", p.Label, strings.Join(missing, ", "))
	}
	return nil
}

// running holds the VMs being migrated by this process (Plan.VM).
var running sync.Map

// Run migrates. On error before the destination runs, every step is
// undone. A second Run for the same Plan.VM while one runs is refused
// with ErrInProgress, before anything is touched.
func Run(ctx context.Context, p *Plan) (rep Report, err error) {
	if p.Log == nil {
		p.Log = slog.Default()
	}
	if err := p.check(); err != nil {
		return Report{}, err
	}
	if _, busy := running.LoadOrStore(p.VM, struct{}{}); busy {
		return Report{}, fmt.Errorf("migrate vm %q: %w", p.VM, ErrInProgress)
	}
	defer running.Delete(p.VM)
	r := &run{p: p}
	r.rep.DiskStrategy = p.Disk.Name()
	if p.Token == 0 {
		// Drawn before the datapath phase's hook, so the journal holds
		// the token before any host accepts it.
		if p.Token, err = datapath.NewToken(); err != nil {
			return Report{}, err
		}
	}
	start := time.Now()
	committed := false
	defer func() {
		r.rep.Total = time.Since(start)
		if err != nil && !committed {
			bg, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			r.mu.Lock()
			defer r.mu.Unlock()
			for i := len(r.undo) - 1; i >= 0; i-- {
				if uerr := r.undo[i](bg); uerr != nil {
					p.Log.Error("undo", "err", uerr)
					err = errors.Join(err, fmt.Errorf("%w: %w", ErrUndo, uerr))
				}
			}
		}
		rep = r.rep
	}()

	// The budget's one owner: the disk stream is paced by this bucket,
	// the memory stream's cap follows what the disk leaves (memory).
	if bw := p.Limits.Bandwidth.BytesPerSecond(); bw > 0 {
		r.diskLimit = rate.NewLimiter(rate.Limit(bw), 256<<10)
	}
	dnsDone := make(chan error, 1)
	if err := r.step(ctx, "datapath", r.datapath); err != nil {
		return r.rep, err
	}
	if p.DNS != nil {
		// The TTL before prepare, read before dns-prepare's hook: the
		// journal holds it before the TTL is lowered.
		if st, err := p.DNS.Show(ctx, p.Zone, p.DNSName); err == nil {
			r.mu.Lock()
			r.dnsShownTTL = st.MaxTTL()
			r.mu.Unlock()
		}
		// Lowering the TTL and waiting it out runs beside the disk copy.
		go func() { dnsDone <- r.step(ctx, "dns-prepare", r.dnsPrepare) }()
	} else {
		dnsDone <- nil
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"destination", r.destination},
		{"disk-bulk", r.diskBulk},
		{"disk-prehash", r.diskPrehash},
	}
	for _, s := range steps {
		if err := r.step(ctx, s.name, s.fn); err != nil {
			<-dnsDone
			return r.rep, err
		}
	}
	if err := <-dnsDone; err != nil {
		return r.rep, err
	}
	if err := r.step(ctx, "memory", r.memory); err != nil {
		return r.rep, err
	}
	committed = true // the VM runs at the destination: from here on, go forward
	r.setCommitted()
	if err := r.step(ctx, "disk-release", r.diskRelease); err != nil {
		p.Log.Warn("disk teardown", "err", err)
	}
	if p.OnResumed != nil {
		if err := p.OnResumed(ctx); err != nil {
			return r.rep, fmt.Errorf("%w: %w", ErrFollowUp, err)
		}
	}
	r.rep.Health = "none"
	if p.Health.Enabled() {
		if err := r.step(ctx, "health", r.health); err != nil {
			r.rep.SourceKept = true
			return r.rep, err
		}
	}
	if p.DNS != nil {
		if err := r.step(ctx, "dns-flip", r.dnsFlip); err != nil {
			return r.rep, fmt.Errorf("%w: %w", ErrFollowUp, err)
		}
		if err := r.step(ctx, "dns-restore", r.dnsRestore); err != nil {
			p.Log.Warn("dns TTL restore: the new record keeps the low TTL", "err", err)
		}
	}
	if err := r.step(ctx, "source-cleanup", r.sourceCleanup); err != nil {
		p.Log.Warn("source cleanup", "err", err)
	}
	return r.rep, nil
}

func (r *run) datapath(ctx context.Context) error {
	p := r.p
	var err error
	// The destination first: its end of the tunnel (in userspace mode a
	// WireGuard key and port) is the source's peer; the source's end
	// reaches the destination with AttachVM.
	if p.dstEnd, err = p.Dest.PrepareDestination(ctx, DestPrepare{Tunnel: p.tunnel(p.SourceWAN)}); err != nil {
		return err
	}
	r.onFailure(func(ctx context.Context) error { return p.Dest.RetireTunnel(ctx, p.tunnel(p.SourceWAN)) })
	// Installed off: switching it on inside the pause is one map write
	// (userspace: a route, a proxy neighbour and a gratuitous ARP).
	if p.srcEnd, err = p.Source.PrepareSource(ctx, SourcePrepare{Tunnel: p.tunnel(p.DestWAN), OldIP: p.OldIP, OldIP6: p.OldIP6, MAC: p.VMMAC.String()}); err != nil {
		return err
	}
	r.onFailure(func(ctx context.Context) error { return p.Source.RetireTunnel(ctx, p.tunnel(p.DestWAN)) })
	r.onFailure(func(ctx context.Context) error {
		return p.Source.RemoveRedirect(ctx, RedirectRemove{OldIP: p.OldIP, OldIP6: p.OldIP6})
	})
	return nil
}

func (r *run) dnsPrepare(ctx context.Context) error {
	p := r.p
	res, err := p.DNS.Prepare(ctx, p.Zone, p.DNSName, p.TTL)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.dnsPre = &res
	r.mu.Unlock()
	r.rep.DNSBefore = res.Before.Records
	if res.Changed {
		r.onFailure(func(ctx context.Context) error {
			_, err := p.DNS.Restore(ctx, p.Zone, p.DNSName, res.Before.MaxTTL())
			return err
		})
	}
	// The whole old TTL, however long: a resolver that cached the record
	// just before prepare holds it that long, and only the redirect (kept
	// by Drain until then too) reaches the VM for its clients.
	r.dnsPreAt = time.Now()
	wait := time.Duration(res.Wait)
	r.rep.DNSWait = wait
	p.Log.Info("dns-prepare: waiting out the old TTL", "wait", wait)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(wait):
	}
	return nil
}

// vmAttach is the VM's network at the destination; peer is the tunnel
// back to the source (invalid once drained).
func (p *Plan) vmAttach(t Tunnel) VMAttach {
	return VMAttach{Tap: p.DestTap, OldIP: p.OldIP, NewIP: p.NewIP, Gateway: p.Gateway,
		OldIP6: p.OldIP6, NewIP6: p.NewIP6, Gateway6: p.Gateway6,
		GatewayMAC: p.GatewayMAC.String(), MAC: p.VMMAC.String(), Tunnel: t}
}

// destination creates the destination image, starts the destination
// hypervisor waiting for the stream, and readies the VM's network there.
func (r *run) destination(ctx context.Context) error {
	p := r.p
	img, err := p.Source.StatImage(ctx, ImageRef{Path: p.SourceDisk})
	if err != nil {
		return err
	}
	abort := DestAbort{OldIP: p.OldIP, NewIP: p.NewIP, OldIP6: p.OldIP6, NewIP6: p.NewIP6, Image: p.DestDisk}
	if err := p.Dest.CreateImage(ctx, ImageCreate{Path: p.DestDisk, Size: img.Size, Need: max(img.Allocated, 1)}); err != nil {
		return err
	}
	r.onFailure(func(ctx context.Context) error { return p.Dest.Abort(ctx, abort) })
	if err := p.Driver.PrepareDestination(ctx); err != nil {
		return err
	}
	r.onFailure(p.Driver.AbortDestination)
	if pf, ok := p.Driver.(hypervisor.Preflighter); ok {
		warn, err := pf.Preflight(ctx)
		if err != nil {
			return err
		}
		for _, w := range warn {
			p.Log.Warn("preflight", "warning", w)
		}
		r.rep.Warnings = append(r.rep.Warnings, warn...)
	}
	// Packets for the VM arriving before it resumes wait in its tap.
	return p.Dest.AttachVM(ctx, p.vmAttach(p.tunnel(p.SourceWAN)))
}

// diskBulk copies the disk while the VM runs, paced by the disk's share
// of the budget.
func (r *run) diskBulk(ctx context.Context) error {
	p := r.p
	r.onFailure(p.Disk.Abort)
	var logged time.Time
	err := p.Disk.Bulk(ctx, r.diskLimit, func(pr storage.BulkProgress) {
		r.rep.DiskBytes = max(r.rep.DiskBytes, pr.Done)
		if p.DiskProgress != nil {
			p.DiskProgress(pr)
		}
		if time.Since(logged) > 5*time.Second {
			logged = time.Now()
			p.Log.Info("disk bulk copy", "strategy", p.Disk.Name(), "round", pr.Round, "done", pr.Done, "total", pr.Total,
				"sent_mib", pr.Sent>>20, "mbit_s", int(pr.Rate/1e6), "eta", pr.ETA.Round(time.Second))
		}
	})
	r.diskStats()
	return err
}

// diskStats copies the strategy's counts into the report.
func (r *run) diskStats() {
	st := r.p.Disk.Stats()
	if st.Copied > 0 {
		r.rep.DiskBytes = st.Copied
	}
	r.rep.DiskWire, r.rep.DiskRounds, r.rep.DiskCuts = max(st.Wire, 0), st.Rounds, st.Cuts
}

// diskPrehash hashes both images once the bulk copy is done, if the
// strategy tracks what is written from here on, so that the pause only
// re-hashes that. One image after the other: the guest runs, and on a
// small host a second hashing core would be taken from it.
func (r *run) diskPrehash(ctx context.Context) error {
	p := r.p
	track, err := p.Disk.Prehash(ctx)
	if err != nil || !track {
		return err
	}
	sd, err := p.Source.HashImage(ctx, HashRequest{Path: p.SourceDisk, Whole: true})
	if err != nil {
		return err
	}
	dd, err := p.Dest.HashImage(ctx, HashRequest{Path: p.DestDisk, Whole: true})
	if err != nil {
		return err
	}
	r.tracked = true
	r.rep.DigestRead = sd.Read + dd.Read
	return nil
}

// diskFinal is the disk's part of the pause: the strategy's last delta,
// then the proof: the strategy's own digest comparison (chunked engine),
// or both hosts hashing their image (the written chunks after a tracked
// pre-hash; else whole) and the migrator comparing the roots.
func (r *run) diskFinal(ctx context.Context) error {
	p := r.p
	fd, err := p.Disk.Final(ctx)
	r.diskStats()
	r.rep.VerifyChunks = fd.Sent
	if err != nil {
		return err
	}
	if fd.Proven {
		r.rep.Digest, r.rep.DigestMatch = fmt.Sprintf("%x", fd.Digest[:min(8, len(fd.Digest))]), true
		return nil
	}
	return r.verifyDisk(ctx, fd)
}

// verifyDisk has both hosts hash their image inside the pause, at once,
// and compares the digests.
func (r *run) verifyDisk(ctx context.Context, fd storage.FinalDelta) error {
	p := r.p
	whole := fd.Whole || !r.tracked
	if whole {
		fd.Chunks = nil
	}
	var sd, dd Digests
	var derr error
	done := make(chan struct{})
	go func() {
		dd, derr = p.Dest.HashImage(ctx, HashRequest{Path: p.DestDisk, Whole: whole, Chunks: fd.Chunks})
		close(done)
	}()
	sd, err := p.Source.HashImage(ctx, HashRequest{Path: p.SourceDisk, Whole: whole, Chunks: fd.Chunks})
	<-done
	if err = errors.Join(err, derr); err != nil {
		return err
	}
	r.rep.VerifyRead = sd.Read + dd.Read
	if !whole {
		r.rep.VerifyChunks = len(fd.Chunks)
	}
	r.rep.Digest = fmt.Sprintf("%x", sd.Root[:min(8, len(sd.Root))])
	if !bytes.Equal(sd.Root, dd.Root) {
		return fmt.Errorf("disk digest mismatch: source %x, destination %x", sd.Root[:min(8, len(sd.Root))], dd.Root[:min(8, len(dd.Root))])
	}
	r.rep.DigestMatch = true
	return nil
}

// diskRelease ends the disk's transfer once the VM runs at the destination.
func (r *run) diskRelease(ctx context.Context) error {
	err := r.p.Disk.Release(ctx)
	r.diskStats()
	return err
}

// memory runs the live migration; the switchover hook (source paused,
// destination not yet running) switches the network, then finishes the
// disk and proves it by digest.
func (r *run) memory(ctx context.Context) error {
	p := r.p
	redirect := RedirectSwitch{OldIP: p.OldIP, OldIP6: p.OldIP6, Tunnel: p.tunnel(p.DestWAN), MAC: p.VMMAC.String()}
	var redirectOn bool
	r.onFailure(func(ctx context.Context) error {
		if redirectOn {
			return p.Source.SetRedirect(ctx, redirect)
		}
		return nil
	})
	if bs, ok := p.Driver.(hypervisor.BandwidthSetter); ok && r.diskLimit != nil && p.Disk.Sent() >= 0 {
		sctx, stop := context.WithCancel(ctx)
		shared := make(chan struct{})
		go func() { r.shareBandwidth(sctx, bs, p.Disk.Sent, shareInterval); close(shared) }()
		defer func() { stop(); <-shared }()
	}
	wd := r.newWatchdog(ctx)
	defer wd.stop()
	res, err := p.Driver.Migrate(wd.ctx, p.Limits, wd.progress, func(ctx context.Context) error {
		wd.hook(true)
		defer wd.hook(false)
		// Packets for the VM go to the destination from now: every one that
		// reached the stopped source would be lost with it.
		if p.NoRedirect {
			p.Log.Warn("redirect left off (NoRedirect): packets for the old address are lost from now")
			if p.OnSwitch != nil {
				if err := p.OnSwitch(ctx); err != nil {
					return err
				}
			}
			return r.diskFinal(ctx)
		}
		on := redirect
		on.On = true
		if err := p.Source.SetRedirect(ctx, on); err != nil {
			return err
		}
		redirectOn = true
		if p.OnSwitch != nil {
			if err := p.OnSwitch(ctx); err != nil {
				return err
			}
		}
		return r.diskFinal(ctx)
	})
	r.rep.Runtime = res
	r.rep.Pause = res.Downtime
	err = wd.explain(err)
	if err == nil {
		// The flows host A saw before the switch, for host B's NAT (so no
		// new client flow gets a tuple the guest still holds). Only
		// between hosts in this process yet: the datapath has no export
		// and import of flows for the peer API.
		sh, sok := p.Source.(*Host)
		dh, dok := p.Dest.(*Host)
		if sok && dok && sh.dp != nil && dh.dp != nil {
			if _, merr := datapath.MoveFlows(sh.dp, dh.dp, p.OldIP); merr != nil {
				p.Log.Warn("move flows to the destination", "err", merr)
			}
		}
	}
	return err
}

// shareBandwidth keeps the memory stream's cap at what the disk stream
// leaves of the budget, measured every interval (shareInterval).
func (r *run) shareBandwidth(ctx context.Context, bs hypervisor.BandwidthSetter, sent func() int64, every time.Duration) {
	total := r.p.Limits.Bandwidth.BytesPerSecond()
	cur, last, lastT := total, sent(), time.Now()
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		n, now := sent(), time.Now()
		want := MemoryShare(total, float64(n-last)/now.Sub(lastT).Seconds())
		last, lastT = n, now
		if want*10 < cur*9 || want*10 > cur*11 {
			if err := bs.SetBandwidth(ctx, want); err != nil {
				r.p.Log.Warn("memory bandwidth", "err", err)
				continue
			}
			r.p.Log.Info("memory bandwidth", "mbit_s", want*8/1e6, "disk_mbit_s", (total-want)*8/1e6)
			cur = want
		}
	}
}

// shareInterval is how often the memory stream's cap follows the disk's.
var shareInterval = 500 * time.Millisecond

// MemoryShare is the memory stream's cap when the disk stream runs at
// diskRate (bytes/s) within a budget of total: what the disk leaves, but
// never under a quarter, so the memory copy always converges.
func MemoryShare(total uint64, diskRate float64) uint64 {
	left := float64(total) - max(diskRate, 0)
	return max(uint64(max(left, 0)), total/4)
}

func (r *run) dnsFlip(ctx context.Context) error {
	p := r.p
	res, err := p.DNS.Flip(ctx, p.Zone, p.DNSName, p.OldAddrs(), p.NewAddrs(), p.TTL)
	r.rep.DNSAfter = res.After.Records
	// Resolvers may hold the old address for the TTL it had at the flip,
	// and no less than what is left of the TTL before prepare.
	until := time.Now().Add(time.Duration(res.Before.MaxTTL()) * time.Second)
	if r.dnsPre != nil {
		until = later(until, r.dnsPreAt.Add(time.Duration(r.dnsPre.Before.MaxTTL())*time.Second))
	}
	p.dnsCachedUntil = until
	r.rep.DNSCachedFor = time.Until(until).Round(time.Second)
	return err
}

// health waits until the VM serves at the destination. On failure the
// source stays paused (not quit), DNS unchanged, the redirect on: the
// operator chooses between waiting for the destination and Fallback.
func (r *run) health(ctx context.Context) error {
	p := r.p
	took, err := p.Health.Wait(ctx)
	if err != nil {
		r.rep.Health = err.Error()
		return fmt.Errorf("%w\n  the VM runs (or ran) on %s; the source VM is kept paused on %s (QMP %s) with its disk as of the switch;\n"+
			"  DNS still names %s and the redirect to %s is on. To fall back: stop the VM on %s, remove the redirect on %s,\n"+
			"  then resume the source (QMP \"cont\"); or fix the VM on %s and flip DNS (vmhop dns flip)", err,
			p.DestWAN, p.SourceWAN, p.SourceQMP, p.OldIP, p.DestWAN, p.DestWAN, p.SourceWAN, p.DestWAN)
	}
	r.rep.Health = fmt.Sprintf("passed after %s (%s)", took.Round(time.Millisecond), p.Health)
	return nil
}

// Fallback returns a VM whose destination failed its health check to the
// source: the destination is stopped, the redirect and the destination's
// datapath entries removed, and the kept source resumed (its disk is as of
// the switch: every write before it is there, none after).
func Fallback(ctx context.Context, p *Plan) error {
	var errs []error
	errs = append(errs, p.Driver.AbortDestination(ctx))
	errs = append(errs, p.Source.RemoveRedirect(ctx, RedirectRemove{OldIP: p.OldIP, OldIP6: p.OldIP6}))
	// The image stays: it holds what the destination VM wrote after resume.
	errs = append(errs, p.Dest.Abort(ctx, DestAbort{OldIP: p.OldIP, NewIP: p.NewIP, OldIP6: p.OldIP6, NewIP6: p.NewIP6, Image: p.DestDisk, KeepImage: true}))
	errs = append(errs, p.Driver.ResumeSource(ctx))
	return errors.Join(errs...)
}

// dnsRestore raises the TTL back to what it was before prepare, once the
// move succeeded (the new address is then as cacheable as the old one was).
func (r *run) dnsRestore(ctx context.Context) error {
	p := r.p
	if r.dnsPre == nil || r.dnsPre.Before.MaxTTL() <= p.TTL {
		return nil // prepare lowered nothing
	}
	res, err := p.DNS.Restore(ctx, p.Zone, p.DNSName, r.dnsPre.Before.MaxTTL())
	if err == nil {
		r.rep.DNSAfter = res.After.Records
	}
	return err
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// drained says whether Drain may remove the redirect, elapsed into the
// drain, the old address's last redirected packet idle ago (seen: any at
// all): quiet for DrainIdle or past DrainTimeout, and never before the DNS
// caches can have dropped the old address.
func (p *Plan) drained(elapsed, idle time.Duration, seen bool, now time.Time) bool {
	quiet := (seen && idle >= p.DrainIdle) || (!seen && elapsed >= p.DrainIdle) || elapsed >= p.DrainTimeout
	return quiet && !now.Before(p.dnsCachedUntil)
}

func (r *run) sourceCleanup(ctx context.Context) error {
	if st, err := r.p.Source.RedirectState(ctx, RedirectQuery{OldIP: r.p.OldIP}); err == nil {
		r.rep.Redirected = st.Counters
	}
	return r.p.Driver.StopSource(ctx)
}

// Drain keeps the redirect until no packet for the old address was
// redirected for DrainIdle (or DrainTimeout passed), and in any case until
// resolvers can no longer hold the old address (the TTL it had at the DNS
// flip, which DrainTimeout does not cut short); then removes it and stops
// sending the VM's traffic back through the tunnel; both hosts then stop
// accepting the migration's tunnel token (a peer whose last migration
// drained is forgotten).
func Drain(ctx context.Context, p *Plan) (d time.Duration, err error) {
	t0 := time.Now()
	if err := p.phase(ctx, PhaseEvent{Phase: "drain", Token: p.Token, Committed: true}); err != nil {
		return 0, fmt.Errorf("drain: %w", err)
	}
	defer func() {
		ev := PhaseEvent{Phase: "drain", End: true, Token: p.Token, Committed: true, Duration: time.Since(t0)}
		if err != nil {
			ev.Err = err.Error()
		}
		if herr := p.phase(ctx, ev); err == nil && herr != nil {
			err = fmt.Errorf("drain: %w", herr)
		}
	}()
	a, b := p.Source, p.Dest
	for {
		st, err := a.RedirectState(ctx, RedirectQuery{OldIP: p.OldIP})
		if err != nil {
			return time.Since(t0), err
		}
		if p.drained(time.Since(t0), st.Idle, st.Seen, time.Now()) {
			break
		}
		select {
		case <-ctx.Done():
			return time.Since(t0), ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err := a.RemoveRedirect(ctx, RedirectRemove{OldIP: p.OldIP, OldIP6: p.OldIP6}); err != nil {
		return time.Since(t0), err
	}
	if err := b.AttachVM(ctx, p.vmAttach(Tunnel{})); err != nil {
		return time.Since(t0), err
	}
	// The migration's tunnel is retired on both hosts.
	return time.Since(t0), errors.Join(a.RetireTunnel(ctx, p.tunnel(p.DestWAN)), b.RetireTunnel(ctx, p.tunnel(p.SourceWAN)))
}
