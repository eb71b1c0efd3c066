package storage

import (
	"encoding/binary"
	"sort"
	"sync"
)

// TrackGranularity is the unit writes are tracked in (and QEMU's dirty
// bitmap granularity it is checked against).
const TrackGranularity = 64 << 10

// nbdTracker reads the client-to-server half of an NBD connection and
// records which clusters the client writes (WRITE, WRITE_ZEROES, TRIM)
// once the transmission phase has begun.
//
// Handshake (fixed newstyle, client side): 4 bytes of client flags, then
// options, each "IHAVEOPT" + option(4) + length(4) + data; NBD_OPT_GO (7)
// or NBD_OPT_EXPORT_NAME (1) ends it. Then requests: magic 0x25609513,
// flags(2), type(2), handle(8), offset(8), length(4), and WRITE's payload.
type nbdTracker struct {
	mu      sync.Mutex
	buf     []byte
	state   int    // 0 flags, 1 options, 2 requests, 3 write payload, 4 lost sync
	skip    uint64 // payload bytes still to pass
	dirty   map[uint64]struct{}
	enabled bool
}

const (
	nbdOptExportName = 1
	nbdOptGo         = 7
	nbdRequestMagic  = 0x25609513
	nbdCmdWrite      = 1
	nbdCmdTrim       = 4
	nbdCmdWriteZero  = 6
)

// Write consumes stream bytes; it never fails (tracking must not break the copy).
func (t *nbdTracker) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	for {
		switch t.state {
		case 0:
			if len(t.buf) < 4 {
				return len(p), nil
			}
			t.buf, t.state = t.buf[4:], 1
		case 1:
			if len(t.buf) < 16 {
				return len(p), nil
			}
			opt := binary.BigEndian.Uint32(t.buf[8:])
			n := int(binary.BigEndian.Uint32(t.buf[12:]))
			if string(t.buf[:8]) != "IHAVEOPT" {
				t.state = 4
				continue
			}
			if len(t.buf) < 16+n {
				return len(p), nil
			}
			t.buf = t.buf[16+n:]
			if opt == nbdOptGo || opt == nbdOptExportName {
				t.state = 2
			}
		case 2:
			if len(t.buf) < 28 {
				return len(p), nil
			}
			if binary.BigEndian.Uint32(t.buf) != nbdRequestMagic {
				t.state = 4
				continue
			}
			typ := binary.BigEndian.Uint16(t.buf[6:])
			off := binary.BigEndian.Uint64(t.buf[16:])
			n := uint64(binary.BigEndian.Uint32(t.buf[24:]))
			t.buf = t.buf[28:]
			if (typ == nbdCmdWrite || typ == nbdCmdTrim || typ == nbdCmdWriteZero) && t.enabled && n > 0 {
				for c := off / TrackGranularity; c <= (off+n-1)/TrackGranularity; c++ {
					t.dirty[c] = struct{}{}
				}
			}
			if typ == nbdCmdWrite {
				t.skip, t.state = n, 3
			}
		case 3:
			k := min(t.skip, uint64(len(t.buf)))
			t.buf, t.skip = t.buf[k:], t.skip-k
			if t.skip > 0 {
				return len(p), nil
			}
			t.state = 2
		case 4: // unparsable: stop tracking; Lost makes verification read everything
			t.buf = nil
			return len(p), nil
		}
	}
}

// Reset starts a new tracking window.
func (t *nbdTracker) reset() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.dirty, t.enabled = map[uint64]struct{}{}, true
}

// Dirty returns the clusters written since reset, sorted, and whether the
// stream stayed parsable.
func (t *nbdTracker) snapshot() ([]uint64, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]uint64, 0, len(t.dirty))
	for c := range t.dirty {
		out = append(out, c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out, t.state != 4 && t.enabled
}
