package storage

import (
	"encoding/binary"
	"sort"
	"sync"
)

// TrackGranularity is the unit writes are tracked in (and QEMU's dirty
// bitmap granularity it is checked against).
const TrackGranularity = 64 << 10

// nbdTracker records which clusters an NBD client writes (WRITE,
// WRITE_ZEROES, TRIM) over one or more connections (a reconnect starts a
// new stream; requests in flight on a cut one are resent on the next).
//
// Requests (transmission phase): magic 0x25609513, flags(2), type(2),
// handle(8), offset(8), length(4), and WRITE's payload.
type nbdTracker struct {
	mu      sync.Mutex
	dirty   map[uint64]struct{}
	enabled bool
	lost    bool // a stream could not be followed
}

// nbdStream reads the client-to-server half of one NBD connection into
// its tracker.
type nbdStream struct {
	t     *nbdTracker
	buf   []byte
	state int    // 2 requests, 3 write payload, 4 lost sync
	skip  uint64 // payload bytes still to pass
}

// transmission follows a connection from its transmission phase on (the
// relay does the negotiation itself).
func (t *nbdTracker) transmission() *nbdStream { return &nbdStream{t: t, state: 2} }

const (
	nbdOptExportName = 1
	nbdOptGo         = 7
	nbdRequestMagic  = 0x25609513
	nbdCmdWrite      = 1
	nbdCmdTrim       = 4
	nbdCmdWriteZero  = 6
)

// Write consumes stream bytes; it never fails (tracking must not break the copy).
func (s *nbdStream) Write(p []byte) (int, error) {
	t := s.t
	t.mu.Lock()
	defer t.mu.Unlock()
	s.buf = append(s.buf, p...)
	for {
		switch s.state {
		case 2:
			if len(s.buf) < 28 {
				return len(p), nil
			}
			if binary.BigEndian.Uint32(s.buf) != nbdRequestMagic {
				s.state = 4
				continue
			}
			typ := binary.BigEndian.Uint16(s.buf[6:])
			off := binary.BigEndian.Uint64(s.buf[16:])
			n := uint64(binary.BigEndian.Uint32(s.buf[24:]))
			s.buf = s.buf[28:]
			if (typ == nbdCmdWrite || typ == nbdCmdTrim || typ == nbdCmdWriteZero) && t.enabled && n > 0 {
				for c := off / TrackGranularity; c <= (off+n-1)/TrackGranularity; c++ {
					t.dirty[c] = struct{}{}
				}
			}
			if typ == nbdCmdWrite {
				s.skip, s.state = n, 3
			}
		case 3:
			k := min(s.skip, uint64(len(s.buf)))
			s.buf, s.skip = s.buf[k:], s.skip-k
			if s.skip > 0 {
				return len(p), nil
			}
			s.state = 2
		case 4: // unparsable: stop tracking; verification then reads everything
			s.buf, t.lost = nil, true
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
	return out, !t.lost && t.enabled
}
