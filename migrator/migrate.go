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
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/ddns"
	"golang.org/x/time/rate"
)

// Plan is one migration of one QEMU VM.
type Plan struct {
	Label        string // for logs
	Source, Dest *Host
	Driver       *qemu.Driver   // prepared with the destination machine and launcher
	SourceDisk   string         // the source image, for the digest
	DestDisk     string         // the destination image (created empty, same size)
	DestTap      string         // the destination VM's tap on Dest
	NBDListen    netip.AddrPort // where the destination QEMU serves the disk
	// Relay, if set, carries the NBD connection (NBDListen is then local to
	// the destination); nil connects the QEMUs directly with their TLS.
	Relay *storage.Relay
	// Chunked, if set, moves the disk with the chunked engine instead of
	// QEMU's mirror (NBDListen and Relay are then unused): live rounds
	// before the memory copy, the last one inside the pause.
	Chunked *storage.ChunkedSync
	// Limits.Bandwidth is the whole migration's budget: the disk stream
	// takes from it, the memory stream gets what the disk leaves.
	Limits hypervisor.Options

	OldIP, NewIP, Gateway netip.Addr
	VMMAC, GatewayMAC     net.HardwareAddr

	DNS           *ddns.Client // nil: no DNS flip
	Zone, DNSName string
	TTL           uint32 // low TTL for prepare and flip, in seconds

	DrainIdle, DrainTimeout time.Duration

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
	// OnSwitch, if set, runs in the switchover hook before the disk's final
	// step: the source is paused, the redirect on, the destination not yet
	// running (tests send packets here that must wait in the destination's
	// tap, or damage the destination disk to see the migration refuse it).
	OnSwitch func(context.Context) error
	// OnResumed, if set, runs once the VM runs at the destination, before
	// the health check (tests stop the guest here).
	OnResumed func(context.Context) error

	// token is the migration's tunnel token (datapath.Tunnel), made by the
	// datapath phase; Drain retires it.
	token uint64
}

// tunnel is this migration's tunnel towards host to.
func (p *Plan) tunnel(to *Host) datapath.Tunnel {
	return datapath.Tunnel{Peer: to.Address, Token: p.token}
}

// Report is what a migration did, phase by phase.
type Report struct {
	Phases       []Phase
	Runtime      hypervisor.Result
	DiskBytes    uint64 // mirrored by the bulk copy (QEMU's count: holes included)
	DiskWire     int64  // bytes the disk mirror sent to the destination (with a Relay)
	DiskRounds   int    // chunked engine: rounds completed, the final one included
	DiskCuts     int    // chunked engine: connections that broke and were resumed
	DigestMatch  bool
	Digest       string
	DigestRead   int64         // bytes hashed before the pause (holes are free)
	VerifyRead   int64         // bytes hashed inside the pause
	VerifyChunks int           // chunks re-hashed inside the pause (0: whole images)
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
	p          *Plan
	srcH, dstH *storage.Hashes // chunk hashes taken after the bulk copy (with a Relay)
	rep        Report
	undo       []func(context.Context) error // LIFO, run on failure
	mirror     *storage.Mirror
	dnsPre     *ddns.Result
	dnsPreAt   time.Time     // when prepare lowered the TTL
	diskLimit  *rate.Limiter // the disk stream's share of Limits.Bandwidth
}

func (r *run) step(ctx context.Context, name string, fn func(context.Context) error) error {
	t0 := time.Now()
	r.p.Log.Info("phase", "name", name)
	err := fn(ctx)
	ph := Phase{Name: name, Duration: time.Since(t0)}
	if err != nil {
		ph.Err = err.Error()
		r.p.Log.Error("phase failed", "name", name, "err", err)
	}
	r.rep.Phases = append(r.rep.Phases, ph)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

func (r *run) onFailure(f func(context.Context) error) { r.undo = append(r.undo, f) }

// Run migrates. On error before the destination runs, every step is undone.
func Run(ctx context.Context, p *Plan) (rep Report, err error) {
	if p.Log == nil {
		p.Log = slog.Default()
	}
	r := &run{p: p}
	start := time.Now()
	committed := false
	defer func() {
		r.rep.Total = time.Since(start)
		if err != nil && !committed {
			bg, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for i := len(r.undo) - 1; i >= 0; i-- {
				if uerr := r.undo[i](bg); uerr != nil {
					p.Log.Error("undo", "err", uerr)
					err = errors.Join(err, fmt.Errorf("undo: %w", uerr))
				}
			}
		}
		rep = r.rep
	}()

	if bw := p.Limits.Bandwidth.BytesPerSecond(); bw > 0 {
		r.diskLimit = rate.NewLimiter(rate.Limit(bw), 256<<10)
		if p.Relay != nil && p.Relay.Limiter == nil {
			p.Relay.Limiter = r.diskLimit
		}
		if p.Chunked != nil && p.Chunked.Limiter == nil {
			p.Chunked.Limiter = r.diskLimit
		}
	}
	dnsDone := make(chan error, 1)
	if err := r.step(ctx, "datapath", r.datapath); err != nil {
		return r.rep, err
	}
	if p.DNS != nil {
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
	if r.srcH != nil {
		_ = p.Driver.Source().Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": "disk0", "name": verifyBitmap}, nil)
	}
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
	a, err := p.Source.Datapath()
	if err != nil {
		return err
	}
	b, err := p.Dest.Datapath()
	if err != nil {
		return err
	}
	if p.token, err = datapath.NewToken(); err != nil {
		return err
	}
	if err := a.SetPeer(p.tunnel(p.Dest), true); err != nil {
		return err
	}
	r.onFailure(func(context.Context) error { return a.SetPeer(p.tunnel(p.Dest), false) })
	if err := b.SetPeer(p.tunnel(p.Source), true); err != nil {
		return err
	}
	r.onFailure(func(context.Context) error { return b.SetPeer(p.tunnel(p.Source), false) })
	// Installed off: switching it on inside the pause is one map write.
	if err := a.SetRedirect(p.OldIP, p.tunnel(p.Dest), p.VMMAC, false); err != nil {
		return err
	}
	r.onFailure(func(context.Context) error { return a.RemoveRedirect(p.OldIP) })
	return nil
}

func (r *run) dnsPrepare(ctx context.Context) error {
	p := r.p
	res, err := p.DNS.Prepare(ctx, p.Zone, p.DNSName, p.TTL)
	if err != nil {
		return err
	}
	r.dnsPre = &res
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

func (r *run) destination(ctx context.Context) error {
	p := r.p
	if err := p.Driver.PrepareDestination(ctx); err != nil {
		return err
	}
	r.onFailure(p.Driver.AbortDestination)
	warn, err := p.Driver.Preflight(ctx)
	if err != nil {
		return err
	}
	for _, w := range warn {
		p.Log.Warn("preflight", "warning", w)
	}
	r.rep.Warnings = append(r.rep.Warnings, warn...)
	b := p.Dest.dp
	tap, err := p.Dest.AttachVM(p.DestTap)
	if err != nil {
		return err
	}
	// Packets for the VM arriving before it resumes wait in its tap.
	if err := b.SetVM(datapath.VM{OldIP: p.OldIP, NewIP: p.NewIP, Gateway: p.Gateway, GatewayMAC: p.GatewayMAC,
		MAC: p.VMMAC, Tap: tap, Peer: p.Source.Address, Token: p.token}); err != nil {
		return err
	}
	r.onFailure(func(context.Context) error { return b.RemoveVM(p.OldIP, p.NewIP) })
	return nil
}

func (r *run) diskBulk(ctx context.Context) error {
	p := r.p
	if err := p.Driver.ConnectSource(ctx); err != nil {
		return err
	}
	if p.Chunked != nil {
		return r.chunkedRounds(ctx)
	}
	// No speed cap on the mirror: QEMU 7.2 charges holes against it, so a
	// sparse disk would crawl; the WAN is the limit.
	r.mirror = &storage.Mirror{Src: p.Driver.Source(), Dst: p.Driver.Destination(), Node: "disk0",
		Listen: p.NBDListen, TLS: p.Driver.TLSObject()}
	if p.Relay != nil {
		if err := p.Relay.Start(ctx); err != nil {
			return err
		}
		r.onFailure(func(context.Context) error { return p.Relay.Close() })
		r.mirror.SourceSocket, r.mirror.TLS = p.Relay.SourceSock, ""
		// A WAN cut longer than the relay's stall limit breaks the NBD
		// connection; QEMU reconnects and the job carries on.
		r.mirror.ReconnectDelay = mirrorReconnectDelay
		r.mirror.BeforeConnect = p.Relay.Negotiate
	}
	if err := r.mirror.Start(ctx); err != nil {
		r.mirror.Abort(context.Background())
		return err
	}
	r.onFailure(r.mirror.Abort)
	var logged time.Time
	return r.mirror.WaitReady(ctx, func(pr storage.Progress) {
		r.rep.DiskBytes = pr.Done
		if time.Since(logged) > 5*time.Second {
			logged = time.Now()
			p.Log.Info("disk bulk copy", "done_mib", pr.Done>>20, "total_mib", pr.Total>>20,
				"mbit_s", int(pr.Rate/1e6), "eta", pr.ETA.Round(time.Second))
		}
	})
}

// chunkedRounds runs the chunked engine's live rounds: the bulk copy,
// then deltas until one is small.
func (r *run) chunkedRounds(ctx context.Context) error {
	p := r.p
	if err := p.Chunked.Start(ctx); err != nil {
		return err
	}
	r.onFailure(func(context.Context) error { return p.Chunked.Close() })
	var logged time.Time
	err := p.Chunked.Converge(ctx, func(pr storage.SyncProgress) {
		if time.Since(logged) > 5*time.Second {
			logged = time.Now()
			p.Log.Info("disk rounds", "round", pr.Round, "scanned", pr.Scanned, "chunks", pr.Chunks,
				"sent_mib", pr.Sent>>20, "mbit_s", int(pr.Rate*8/1e6), "eta", pr.ETA.Round(time.Second))
		}
	})
	r.rep.DiskWire, r.rep.DiskRounds, r.rep.DiskCuts = p.Chunked.Sent(), p.Chunked.Rounds(), p.Chunked.Cuts()
	return err
}

// diskFinal is the disk's part of the pause: with the mirror, wait for
// the in-flight writes and compare digests; with the chunked engine, the
// final round (its digest comparison is the proof).
func (r *run) diskFinal(ctx context.Context) error {
	p := r.p
	if p.Chunked != nil {
		st, err := p.Chunked.Final(ctx)
		r.rep.DiskWire, r.rep.DiskRounds, r.rep.DiskCuts = p.Chunked.Sent(), p.Chunked.Rounds(), p.Chunked.Cuts()
		r.rep.VerifyChunks = st.Sent + st.Zero + st.Copied
		if err != nil {
			return err
		}
		r.rep.Digest, r.rep.DigestMatch = fmt.Sprintf("%x", st.Root[:8]), true
		return nil
	}
	// The mirror is synchronous (write-blocking) and the source drained
	// its disk when it paused: the destination already holds every
	// acknowledged write, so the final delta is what is in flight, and
	// the digests prove it. The job itself is ended after the switch,
	// as libvirt does, keeping block-graph changes out of the pause.
	if err := r.mirror.WaitSynced(ctx); err != nil {
		return err
	}
	return r.verifyDisk(ctx)
}

// diskRelease ends the disk's transfer once the VM runs at the destination.
func (r *run) diskRelease(ctx context.Context) error {
	p := r.p
	if p.Chunked != nil {
		return p.Chunked.Close()
	}
	err := r.mirror.Complete(ctx)
	if p.Relay != nil {
		r.rep.DiskWire, r.rep.DiskCuts = p.Relay.BytesToDest(), p.Relay.Reconnects()
		p.Relay.Close()
	}
	return err
}

const verifyBitmap = "vmhop-verify"

// mirrorReconnectDelay is how long the mirror's requests wait for the
// WAN to come back before the job (and the migration) fails.
const mirrorReconnectDelay = 60 * time.Second

// diskPrehash hashes both images once the bulk copy is done, so that the
// pause only re-hashes what was written since. Two independent records of
// what was written from here on: QEMU's dirty bitmap on the source disk
// (counts) and the relay's log of NBD writes (locations). At the pause,
// if they agree, only the logged chunks are re-hashed; if not, both images
// are read whole.
func (r *run) diskPrehash(ctx context.Context) error {
	p := r.p
	if p.Relay == nil {
		return nil // the pause reads both images whole
	}
	src := p.Driver.Source()
	if err := src.Execute(ctx, "block-dirty-bitmap-add", map[string]any{"node": "disk0", "name": verifyBitmap,
		"granularity": storage.TrackGranularity}, nil); err != nil {
		return err
	}
	r.onFailure(func(ctx context.Context) error {
		return src.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": "disk0", "name": verifyBitmap}, nil)
	})
	p.Relay.ResetTracking()
	var err error
	// One image after the other: the guest runs, and on a small host a
	// second hashing core would be taken from it.
	if r.srcH, r.dstH, err = hashBoth(p.SourceDisk, p.DestDisk, false); err != nil {
		r.srcH, r.dstH = nil, nil
		return err
	}
	r.rep.DigestRead = r.srcH.Read + r.dstH.Read
	return nil
}

// verifyDisk compares the images inside the pause.
func (r *run) verifyDisk(ctx context.Context) error {
	p := r.p
	src, dst := r.srcH, r.dstH
	var chunks []int64
	if src != nil {
		written, followed := p.Relay.Written()
		count, err := dirtyCount(ctx, p.Driver, verifyBitmap)
		if err == nil && followed && count == uint64(len(written))*storage.TrackGranularity {
			last := int64(-1)
			for _, c := range written {
				if ch := int64(c * storage.TrackGranularity / storage.DigestChunk); ch != last {
					chunks, last = append(chunks, ch), ch
				}
			}
		} else {
			p.Log.Warn("disk verify: reading both images whole", "relay_followed", followed,
				"relay_clusters", len(written), "qemu_dirty_bytes", count, "err", err)
			src = nil
		}
	}
	if src == nil { // no pre-hash, or the records disagree: hash everything
		var err error
		if src, dst, err = hashBoth(p.SourceDisk, p.DestDisk, true); err != nil {
			return err
		}
		r.rep.VerifyRead = src.Read + dst.Read
	} else {
		before := src.Read + dst.Read
		var derr error
		done := make(chan struct{})
		go func() { derr = dst.Update(chunks); close(done) }()
		err := src.Update(chunks)
		<-done
		if err = errors.Join(err, derr); err != nil {
			return err
		}
		r.rep.VerifyRead = src.Read + dst.Read - before
		r.rep.VerifyChunks = len(chunks)
	}
	s, d := src.Root(), dst.Root()
	r.rep.Digest = fmt.Sprintf("%x", s[:8])
	if !bytes.Equal(s, d) {
		return fmt.Errorf("disk digest mismatch: source %x, destination %x", s[:8], d[:8])
	}
	r.rep.DigestMatch = true
	return nil
}

// hashBoth hashes the two images, at once (one per core) if parallel.
func hashBoth(src, dst string, parallel bool) (*storage.Hashes, *storage.Hashes, error) {
	if !parallel {
		sh, err := storage.HashImage(src)
		if err != nil {
			return nil, nil, err
		}
		dh, err := storage.HashImage(dst)
		return sh, dh, err
	}
	var dh *storage.Hashes
	var derr error
	done := make(chan struct{})
	go func() { dh, derr = storage.HashImage(dst); close(done) }()
	sh, err := storage.HashImage(src)
	<-done
	return sh, dh, errors.Join(err, derr)
}

// dirtyCount reads the byte count of a dirty bitmap on the source's disk0.
func dirtyCount(ctx context.Context, d *qemu.Driver, name string) (uint64, error) {
	var nodes []struct {
		NodeName string `json:"node-name"`
		Bitmaps  []struct {
			Name  string `json:"name"`
			Count uint64 `json:"count"`
		} `json:"dirty-bitmaps"`
	}
	if err := d.Source().Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return 0, err
	}
	for _, n := range nodes {
		for _, b := range n.Bitmaps {
			if n.NodeName == "disk0" && b.Name == name {
				return b.Count, nil
			}
		}
	}
	return 0, fmt.Errorf("dirty bitmap %q not found", name)
}

// memory runs the live migration; the switchover hook (source paused,
// destination not yet running) finishes the disk, proves it by digest and
// switches the network.
func (r *run) memory(ctx context.Context) error {
	p := r.p
	a := p.Source.dp
	var redirectOn bool
	r.onFailure(func(context.Context) error {
		if redirectOn {
			return a.SetRedirect(p.OldIP, p.tunnel(p.Dest), p.VMMAC, false)
		}
		return nil
	})
	if sent := r.diskSent(); sent != nil && r.diskLimit != nil {
		sctx, stop := context.WithCancel(ctx)
		defer stop()
		go r.shareBandwidth(sctx, sent)
	}
	res, err := p.Driver.Migrate(ctx, p.Limits, p.Progress, func(ctx context.Context) error {
		// Packets for the VM go to the destination from now: every one that
		// reached the stopped source would be lost with it.
		if err := a.SetRedirect(p.OldIP, p.tunnel(p.Dest), p.VMMAC, true); err != nil {
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
	if err == nil {
		// The flows host A saw before the switch, for host B's NAT (so no
		// new client flow gets a tuple the guest still holds).
		if _, merr := datapath.MoveFlows(a, p.Dest.dp, p.OldIP); merr != nil {
			p.Log.Warn("move flows to the destination", "err", merr)
		}
	}
	return err
}

// diskSent counts the disk stream's bytes to the destination (nil: no
// count, as without a relay).
func (r *run) diskSent() func() int64 {
	switch {
	case r.p.Chunked != nil:
		return r.p.Chunked.Sent
	case r.p.Relay != nil:
		return r.p.Relay.BytesToDest
	}
	return nil
}

// shareBandwidth keeps the memory stream's cap at what the disk stream
// (mirrored writes) leaves of the budget, measured every half second.
func (r *run) shareBandwidth(ctx context.Context, sent func() int64) {
	total := r.p.Limits.Bandwidth.BytesPerSecond()
	cur, last, lastT := total, sent(), time.Now()
	tick := time.NewTicker(500 * time.Millisecond)
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
			if err := r.p.Driver.SetBandwidth(ctx, want); err != nil {
				r.p.Log.Warn("memory bandwidth", "err", err)
				continue
			}
			r.p.Log.Info("memory bandwidth", "mbit_s", want*8/1e6, "disk_mbit_s", (total-want)*8/1e6)
			cur = want
		}
	}
}

// MemoryShare is the memory stream's cap when the disk stream runs at
// diskRate (bytes/s) within a budget of total: what the disk leaves, but
// never under a quarter, so the memory copy always converges.
func MemoryShare(total uint64, diskRate float64) uint64 {
	left := float64(total) - max(diskRate, 0)
	return max(uint64(max(left, 0)), total/4)
}

func (r *run) dnsFlip(ctx context.Context) error {
	p := r.p
	res, err := p.DNS.Flip(ctx, p.Zone, p.DNSName, []netip.Addr{p.OldIP}, []netip.Addr{p.NewIP}, p.TTL)
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
			p.Dest.Name, p.Source.Name, p.SourceQMP, p.OldIP, p.Dest.Name, p.Dest.Name, p.Source.Name, p.Dest.Name)
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
	if p.Source.dp != nil {
		errs = append(errs, p.Source.dp.RemoveRedirect(p.OldIP))
	}
	if p.Dest.dp != nil {
		errs = append(errs, p.Dest.dp.RemoveVM(p.OldIP, p.NewIP))
	}
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
	if c, err := r.p.Source.dp.Stats(r.p.OldIP); err == nil {
		r.rep.Redirected = c
	}
	return r.p.Driver.Source().Execute(ctx, "quit", nil, nil)
}

// Drain keeps the redirect until no packet for the old address was
// redirected for DrainIdle (or DrainTimeout passed), and in any case until
// resolvers can no longer hold the old address (the TTL it had at the DNS
// flip, which DrainTimeout does not cut short); then removes it and stops
// sending the VM's traffic back through the tunnel; both hosts then stop
// accepting the migration's tunnel token (a peer whose last migration
// drained is forgotten).
func Drain(ctx context.Context, p *Plan) (time.Duration, error) {
	t0 := time.Now()
	a, b := p.Source.dp, p.Dest.dp
	for {
		idle, seen, err := a.Idle(p.OldIP)
		if err != nil {
			return time.Since(t0), err
		}
		if p.drained(time.Since(t0), idle, seen, time.Now()) {
			break
		}
		select {
		case <-ctx.Done():
			return time.Since(t0), ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err := a.RemoveRedirect(p.OldIP); err != nil {
		return time.Since(t0), err
	}
	tap, err := p.Dest.AttachVM(p.DestTap)
	if err != nil {
		return time.Since(t0), err
	}
	if err := b.SetVM(datapath.VM{OldIP: p.OldIP, NewIP: p.NewIP, Gateway: p.Gateway,
		GatewayMAC: p.GatewayMAC, MAC: p.VMMAC, Tap: tap}); err != nil {
		return time.Since(t0), err
	}
	// The migration's tunnel is retired on both hosts.
	return time.Since(t0), errors.Join(a.SetPeer(p.tunnel(p.Dest), false), b.SetPeer(p.tunnel(p.Source), false))
}
