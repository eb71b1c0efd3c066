package storage

import (
	"context"
	"time"

	"golang.org/x/time/rate"
)

// Chunked is the chunked engine as a migration's Strategy: Bulk starts
// the destination's listener and runs the live rounds (Converge), Final is
// the round inside the pause (its digest comparison is the proof),
// Release and Abort close the listener. It reads the raw image the
// hypervisor writes, so it fits any hypervisor (VirtualBox, QEMU with
// storage.mode chunked).
type Chunked struct {
	Sync *ChunkedSync
	// Log's progress every interval (default 5s) while rounds run.
	LogEvery time.Duration
	started  bool
}

var _ Strategy = (*Chunked)(nil)

// Name implements Strategy.
func (c *Chunked) Name() string { return "chunked" }

// Bulk implements Strategy: the live rounds, paced by limit.
func (c *Chunked) Bulk(ctx context.Context, limit *rate.Limiter, progress func(BulkProgress)) error {
	if limit != nil {
		c.Sync.Limiter = limit
	}
	if !c.started {
		if err := c.Sync.Start(ctx); err != nil {
			return err
		}
		c.started = true
	}
	return c.Sync.Converge(ctx, func(pr SyncProgress) {
		if progress != nil {
			progress(BulkProgress{Round: pr.Round, Done: uint64(pr.Scanned), Total: uint64(pr.Chunks),
				Sent: pr.Sent, Rate: pr.Rate * 8, ETA: pr.ETA})
		}
	})
}

// Prehash implements Strategy: nothing to track, the final round
// re-hashes the source image itself.
func (c *Chunked) Prehash(context.Context) (bool, error) { return false, nil }

// Final implements Strategy: the round inside the pause.
func (c *Chunked) Final(ctx context.Context) (FinalDelta, error) {
	st, err := c.Sync.Final(ctx)
	fd := FinalDelta{Sent: st.Sent + st.Zero + st.Copied}
	if err != nil {
		return fd, err
	}
	fd.Proven, fd.Digest = true, st.Root
	return fd, nil
}

// Release implements Strategy.
func (c *Chunked) Release(context.Context) error { return c.Sync.Close() }

// Abort implements Strategy.
func (c *Chunked) Abort(context.Context) error { return c.Sync.Close() }

// Clean is recovery's end of a chunked stream whose process died (this
// Chunked is a new one): the destination's listener and any round in
// progress (StopChunked, idempotent). The source end died with the process.
func (c *Chunked) Clean(ctx context.Context) error {
	if c.Sync == nil || c.Sync.Server == nil {
		return nil
	}
	return c.Sync.Server.StopChunked(ctx, ChunkedStop{Listen: c.Sync.DestWAN})
}

// Sent implements Strategy.
func (c *Chunked) Sent() int64 { return c.Sync.Sent() }

// Stats implements Strategy.
func (c *Chunked) Stats() StrategyStats {
	return StrategyStats{Wire: c.Sync.Sent(), Rounds: c.Sync.Rounds(), Cuts: c.Sync.Cuts()}
}
