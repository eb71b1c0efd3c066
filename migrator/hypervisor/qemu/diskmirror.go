package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/vmhop/vmhop/migrator/storage"
	"golang.org/x/time/rate"
)

// MirrorDisk is QEMU's mirror as a migration's storage.Strategy: the
// destination QEMU exports its empty disk over NBD, the source mirrors into
// it (blockdev-mirror, write-blocking), through a Relay if set. Prehash adds
// a dirty bitmap on the source disk and starts the relay's write log; in
// the pause, Final waits for the mirror to be idle and names the chunks
// both records agree were written (or asks for whole images).
type MirrorDisk struct {
	Driver *Driver // both QEMUs: the source connected, the destination prepared
	// NBDListen is where the destination QEMU serves the disk (its
	// loopback when a Relay carries the connection).
	NBDListen netip.AddrPort
	// Relay, if set, carries the NBD connection over the WAN; nil connects
	// the QEMUs directly with their TLS (the pause then hashes whole images).
	Relay *storage.Relay
	Log   *slog.Logger

	mirror   *Mirror
	bitmap   bool // the verify bitmap is on the source disk
	relayUp  bool
	released bool
}

var _ storage.Strategy = (*MirrorDisk)(nil)

const (
	diskNode     = "disk0" // Machine's disk node name
	verifyBitmap = "vmhop-verify"
	// mirrorReconnectDelay is how long the mirror's requests wait for the
	// WAN to come back before the job (and the migration) fails.
	mirrorReconnectDelay = 60 * time.Second
)

// Name implements storage.Strategy.
func (m *MirrorDisk) Name() string { return "qemu-mirror" }

func (m *MirrorDisk) log() *slog.Logger {
	if m.Log == nil {
		return slog.Default()
	}
	return m.Log
}

// Bulk implements storage.Strategy: start the relay (paced by limit), the
// export and the mirror, and wait until the mirror is ready.
func (m *MirrorDisk) Bulk(ctx context.Context, limit *rate.Limiter, progress func(storage.BulkProgress)) error {
	d := m.Driver
	if err := d.ConnectSource(ctx); err != nil {
		return err
	}
	// No speed cap on the mirror: QEMU 7.2 charges holes against it, so a
	// sparse disk would crawl; the budget is applied at the relay.
	m.mirror = &Mirror{Src: d.Source(), Dst: d.Incoming(), Node: diskNode,
		Listen: m.NBDListen, TLS: d.TLSObject()}
	if r := m.Relay; r != nil {
		if limit != nil {
			r.Limiter = limit
		}
		if err := r.Start(ctx); err != nil {
			return err
		}
		m.relayUp = true
		m.mirror.SourceSocket, m.mirror.TLS = r.SourceSock, ""
		// A WAN cut longer than the relay's stall limit breaks the NBD
		// connection; QEMU reconnects and the job carries on.
		m.mirror.ReconnectDelay = mirrorReconnectDelay
		m.mirror.BeforeConnect = r.Negotiate
	}
	if err := m.mirror.Start(ctx); err != nil {
		return err
	}
	return m.mirror.WaitReady(ctx, func(pr MirrorProgress) {
		if progress != nil {
			progress(storage.BulkProgress{Done: pr.Done, Total: pr.Total, Sent: m.Sent(), Rate: pr.Rate, ETA: pr.ETA})
		}
	})
}

// Prehash implements storage.Strategy. Two independent records of what is
// written from here on: QEMU's dirty bitmap on the source disk (counts)
// and the relay's log of NBD writes (locations). Without a relay nothing
// is tracked: the pause hashes both images whole.
func (m *MirrorDisk) Prehash(ctx context.Context) (bool, error) {
	if m.Relay == nil {
		return false, nil
	}
	if err := m.Driver.Source().Execute(ctx, "block-dirty-bitmap-add", map[string]any{"node": diskNode, "name": verifyBitmap,
		"granularity": storage.TrackGranularity}, nil); err != nil {
		return false, err
	}
	m.bitmap = true
	m.Relay.ResetTracking()
	return true, nil
}

// Final implements storage.Strategy. The mirror is synchronous
// (write-blocking) and the source drained its disk when it paused: the
// destination already holds every acknowledged write, so the final delta
// is what is in flight. The job itself is ended after the switch
// (Release), as libvirt does, keeping block-graph changes out of the pause.
// The relay's WAN sockets go unpaced first: what is in flight is paused time.
func (m *MirrorDisk) Final(ctx context.Context) (storage.FinalDelta, error) {
	if m.Relay != nil {
		if err := m.Relay.LiftPacing(); err != nil {
			m.log().Warn("disk stream: pacing not lifted for the pause", "err", err)
		}
	}
	if err := m.mirror.WaitSynced(ctx); err != nil {
		return storage.FinalDelta{}, err
	}
	if !m.bitmap {
		return storage.FinalDelta{Whole: true}, nil
	}
	written, followed := m.Relay.Written()
	count, err := m.dirtyCount(ctx)
	if err != nil || !followed || count != uint64(len(written))*storage.TrackGranularity {
		m.log().Warn("disk verify: reading both images whole", "relay_followed", followed,
			"relay_clusters", len(written), "qemu_dirty_bytes", count, "err", err)
		return storage.FinalDelta{Whole: true}, nil
	}
	var chunks []int64
	last := int64(-1)
	for _, c := range written {
		if ch := int64(c * storage.TrackGranularity / storage.DigestChunk); ch != last {
			chunks, last = append(chunks, ch), ch
		}
	}
	return storage.FinalDelta{Chunks: chunks}, nil
}

// dirtyCount reads the byte count of the verify bitmap on the source's disk.
func (m *MirrorDisk) dirtyCount(ctx context.Context) (uint64, error) {
	var nodes []struct {
		NodeName string `json:"node-name"`
		Bitmaps  []struct {
			Name  string `json:"name"`
			Count uint64 `json:"count"`
		} `json:"dirty-bitmaps"`
	}
	if err := m.Driver.Source().Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		return 0, err
	}
	for _, n := range nodes {
		for _, b := range n.Bitmaps {
			if n.NodeName == diskNode && b.Name == verifyBitmap {
				return b.Count, nil
			}
		}
	}
	return 0, fmt.Errorf("dirty bitmap %q not found", verifyBitmap)
}

func (m *MirrorDisk) removeBitmap(ctx context.Context) error {
	if !m.bitmap {
		return nil
	}
	m.bitmap = false
	return m.Driver.Source().Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": diskNode, "name": verifyBitmap}, nil)
}

// Release implements storage.Strategy: drop the bitmap, end the mirror
// (the destination keeps an exact copy), the NBD node and the export.
func (m *MirrorDisk) Release(ctx context.Context) error {
	_ = m.removeBitmap(ctx)
	err := m.mirror.Complete(ctx)
	if m.relayUp {
		m.Relay.Close()
		m.relayUp = false
	}
	m.released = true
	return err
}

// Abort implements storage.Strategy.
func (m *MirrorDisk) Abort(ctx context.Context) error {
	if m.released {
		return nil
	}
	var err error
	if m.Driver.Source() != nil {
		_ = m.removeBitmap(ctx)
	}
	if m.mirror != nil {
		err = m.mirror.Abort(ctx)
	}
	if m.relayUp {
		m.Relay.Close()
		m.relayUp = false
	}
	return err
}

// Clean implements migrator.DiskCleaner: recovery's end of a disk
// stream whose process died (this MirrorDisk is a new one, with no state
// of the old one's): the source's mirror job (Mirror.CancelLeftover) and
// verify bitmap, if the source still runs;
// the destination's export; the relay's destination end. Idempotent.
func (m *MirrorDisk) Clean(ctx context.Context) error {
	d := m.Driver
	var errs []error
	if src := d.Source(); src != nil {
		// A source that quit (after the commit point) has nothing left.
		if err := (&Mirror{Src: src, Node: diskNode}).CancelLeftover(ctx); err != nil && !errors.Is(err, ErrClosed) {
			errs = append(errs, err)
		}
		_ = src.Execute(ctx, "block-dirty-bitmap-remove", map[string]any{"node": diskNode, "name": verifyBitmap}, nil)
	}
	if in := d.Incoming(); in != nil {
		errs = append(errs, in.UnexportDisk(ctx))
	}
	if m.Relay != nil && m.Relay.Server != nil {
		errs = append(errs, m.Relay.Server.StopRelay(ctx, storage.RelayStop{Listen: m.Relay.DestWAN}))
	}
	return errors.Join(errs...)
}

// Sent implements storage.Strategy: counted at the relay (-1 without one:
// QEMU's own NBD connection is not counted).
func (m *MirrorDisk) Sent() int64 {
	if m.Relay == nil {
		return -1
	}
	return m.Relay.BytesToDest()
}

// Stats implements storage.Strategy.
func (m *MirrorDisk) Stats() storage.StrategyStats {
	st := storage.StrategyStats{Wire: m.Sent()}
	if m.Relay != nil {
		st.Cuts = m.Relay.Reconnects()
	}
	if m.mirror != nil {
		st.Copied = m.mirror.copied
	}
	return st
}
