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
	Relay  *storage.Relay
	Limits hypervisor.Options

	OldIP, NewIP, Gateway netip.Addr
	VMMAC, GatewayMAC     net.HardwareAddr

	DNS           *ddns.Client // nil: no DNS flip
	Zone, DNSName string
	TTL           uint32        // low TTL for prepare and flip
	MaxTTLWait    time.Duration // cap on waiting out the old TTL after prepare

	DrainIdle, DrainTimeout time.Duration

	Log *slog.Logger
	// Progress, if set, gets memory-migration progress.
	Progress chan<- hypervisor.Progress
}

// Report is what a migration did, phase by phase.
type Report struct {
	Phases      []Phase
	Runtime     hypervisor.Result
	DiskBytes   uint64 // mirrored by the bulk copy
	DigestMatch bool
	Digest      string
	DigestRead  int64         // bytes the digests read (holes are free)
	Pause       time.Duration // source paused to destination running: the hypervisor's downtime
	Total       time.Duration
	Redirected  datapath.Counters // old host's counters for the old address at the end
	DNSBefore   []ddns.Record
	DNSAfter    []ddns.Record
}

// Phase is a named step and how long it took.
type Phase struct {
	Name     string
	Duration time.Duration
	Err      string `json:",omitempty"`
}

type run struct {
	p      *Plan
	rep    Report
	undo   []func(context.Context) error // LIFO, run on failure
	mirror *storage.Mirror
	dnsPre *ddns.Result
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
	if err := r.step(ctx, "disk-release", r.mirror.Complete); err != nil {
		p.Log.Warn("mirror teardown", "err", err)
	}
	if p.Relay != nil {
		p.Relay.Close()
	}
	if p.DNS != nil {
		if err := r.step(ctx, "dns-flip", r.dnsFlip); err != nil {
			return r.rep, err
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
	if err := a.SetPeer(p.Dest.Address, true); err != nil {
		return err
	}
	if err := b.SetPeer(p.Source.Address, true); err != nil {
		return err
	}
	// Installed off: switching it on inside the pause is one map write.
	if err := a.SetRedirect(p.OldIP, p.Dest.Address, p.VMMAC, false); err != nil {
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
	wait := min(time.Duration(res.Wait), p.MaxTTLWait)
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
	b := p.Dest.dp
	tap, err := p.Dest.AttachVM(p.DestTap)
	if err != nil {
		return err
	}
	// Packets for the VM arriving before it resumes wait in its tap.
	if err := b.SetVM(datapath.VM{OldIP: p.OldIP, NewIP: p.NewIP, Gateway: p.Gateway, GatewayMAC: p.GatewayMAC,
		MAC: p.VMMAC, Tap: tap, Peer: p.Source.Address}); err != nil {
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
	}
	if err := r.mirror.Start(ctx); err != nil {
		r.mirror.Abort(context.Background())
		return err
	}
	r.onFailure(r.mirror.Abort)
	return r.mirror.WaitReady(ctx, func(pr storage.Progress) { r.rep.DiskBytes = pr.Done })
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
			return a.SetRedirect(p.OldIP, p.Dest.Address, p.VMMAC, false)
		}
		return nil
	})
	res, err := p.Driver.Migrate(ctx, p.Limits, p.Progress, func(ctx context.Context) error {
		// Packets for the VM go to the destination from now: every one that
		// reached the stopped source would be lost with it.
		if err := a.SetRedirect(p.OldIP, p.Dest.Address, p.VMMAC, true); err != nil {
			return err
		}
		redirectOn = true
		// The mirror is synchronous (write-blocking) and the source drained
		// its disk when it paused: the destination already holds every
		// acknowledged write. No block operation runs here: QEMU 7.2 lets a
		// paused virtio-blk pick up queued requests when a block job ends,
		// and completes them after the device state was sent (the migrated
		// guest then crashes on an unknown completion). The job ends after
		// the switch instead, as libvirt does.
		if err := r.mirror.WaitSynced(ctx); err != nil {
			return err
		}
		type dg struct {
			sum  []byte
			read int64
			err  error
		}
		dc := make(chan dg, 1)
		go func() { s, n, err := storage.Digest(p.DestDisk); dc <- dg{s, n, err} }()
		src, n1, err := storage.Digest(p.SourceDisk)
		d := <-dc
		if err != nil || d.err != nil {
			return errors.Join(err, d.err)
		}
		r.rep.DigestRead = n1 + d.read
		r.rep.Digest = fmt.Sprintf("%x", src[:8])
		if !bytes.Equal(src, d.sum) {
			return fmt.Errorf("disk digest mismatch: source %x, destination %x", src[:8], d.sum[:8])
		}
		r.rep.DigestMatch = true
		return nil
	})
	r.rep.Runtime = res
	r.rep.Pause = res.Downtime
	return err
}

func (r *run) dnsFlip(ctx context.Context) error {
	p := r.p
	res, err := p.DNS.Flip(ctx, p.Zone, p.DNSName, []netip.Addr{p.OldIP}, []netip.Addr{p.NewIP}, p.TTL)
	r.rep.DNSAfter = res.After.Records
	return err
}

func (r *run) sourceCleanup(ctx context.Context) error {
	if c, err := r.p.Source.dp.Stats(r.p.OldIP); err == nil {
		r.rep.Redirected = c
	}
	return r.p.Driver.Source().Execute(ctx, "quit", nil, nil)
}

// Drain keeps the redirect until no packet for the old address was
// redirected for DrainIdle (or DrainTimeout passed), then removes it and
// stops sending the VM's traffic back through the tunnel.
func Drain(ctx context.Context, p *Plan) (time.Duration, error) {
	t0 := time.Now()
	a, b := p.Source.dp, p.Dest.dp
	for time.Since(t0) < p.DrainTimeout {
		idle, seen, err := a.Idle(p.OldIP)
		if err != nil {
			return time.Since(t0), err
		}
		if (seen && idle >= p.DrainIdle) || (!seen && time.Since(t0) >= p.DrainIdle) {
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
	return time.Since(t0), b.SetVM(datapath.VM{OldIP: p.OldIP, NewIP: p.NewIP, Gateway: p.Gateway,
		GatewayMAC: p.GatewayMAC, MAC: p.VMMAC, Tap: tap})
}
