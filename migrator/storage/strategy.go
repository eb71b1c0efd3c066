package storage

import (
	"context"
	"time"

	"golang.org/x/time/rate"
)

// Strategy moves a running VM's disk to the destination host in the
// migrator's named steps, whatever the hypervisor:
//
//	Bulk     while the VM runs: the whole image, then until what is left
//	         fits in the pause
//	Prehash  after Bulk: start recording what is written from now on
//	Final    inside the switchover pause (source stopped): send what is
//	         left, and say what proves the copy
//	Release  once the VM runs at the destination: end the transfer
//	Abort    on failure, from any step: stop, the source image untouched
//
// The migrator owns the bandwidth budget: Bulk gets its share as a token
// bucket. Implementations: the QEMU mirror (qemu.MirrorDisk: QEMU's own
// dirty tracking into an NBD export, through a Relay) and the chunked
// engine (Chunked: rounds of hash-compared chunks, for any raw image).
type Strategy interface {
	// Name says which strategy runs ("qemu-mirror", "chunked"), for logs.
	Name() string
	// Bulk copies the image while the VM runs, reporting progress (if
	// not nil). limit, if not nil, paces every byte sent to the
	// destination (bytes per second, counted before TLS).
	Bulk(ctx context.Context, limit *rate.Limiter, progress func(BulkProgress)) error
	// Prehash starts the record of writes Final reports. Track true: Final
	// will name the chunks written from now on, so the migrator hashes both
	// images now and only those chunks inside the pause.
	Prehash(ctx context.Context) (track bool, err error)
	// Final runs inside the pause: the last delta, and what proves it.
	Final(ctx context.Context) (FinalDelta, error)
	// Release ends the transfer once the VM runs at the destination.
	Release(ctx context.Context) error
	// Abort stops whatever the strategy started; the source image is
	// untouched. Safe to call in any state, more than once.
	Abort(ctx context.Context) error
	// Sent is how many bytes went to the destination so far, all steps
	// (before TLS); -1 when the strategy cannot count them (the migrator
	// then does not share the budget with the memory stream).
	Sent() int64
	// Stats says what the transfer did so far.
	Stats() StrategyStats
}

// BulkProgress is one report of a Strategy's Bulk step.
type BulkProgress struct {
	Round       int           // chunked engine: the live round; 0 for a mirror
	Done, Total uint64        // bytes of the image copied (a mirror counts holes) / to copy
	Sent        int64         // bytes on the wire so far
	Rate        float64       // bits per second
	ETA         time.Duration // to the end of the current pass
}

// FinalDelta is what Final did and how the copy is proven.
type FinalDelta struct {
	// Proven: the strategy compared digests of both images itself (the
	// chunked engine's final round); Digest is the common root.
	Proven bool
	Digest []byte
	// Otherwise the migrator hashes both images: Whole, or only Chunks
	// (DigestChunk indexes, sorted) after a Prehash that tracked.
	Whole  bool
	Chunks []int64
	// Sent counts chunks that crossed inside the pause (chunked engine).
	Sent int
}

// StrategyStats is what a Strategy's transfer did.
type StrategyStats struct {
	Copied uint64 // bulk progress as the hypervisor counts it (holes included); 0 if not counted
	Wire   int64  // bytes sent to the destination (before TLS); -1 if not counted
	Rounds int    // chunked engine: rounds completed, the final one included
	Cuts   int    // WAN connections that broke and were resumed
}
