package guest

import (
	"encoding/binary"
	"fmt"
	"time"
)

// PageSize is the unit MemCheck rewrites and checks: a guest page, the unit
// of QEMU's dirty tracking.
const PageSize = 4096

// memMagic marks a MemCheck page; it is mixed into the check words.
const memMagic = 0x564d484f504d454d // "VMHOPMEM"

// MemCheck is the memory twin of the disk record verifier: it keeps a
// working set of pages in guest RAM, rewrites them with sequenced,
// self-checking content, and checks every page against the sequence it last
// wrote there. A page whose content is older than its last write went back
// in time: a write the migration lost (QEMU's dirty tracking missed it and
// the destination resumed with the stale page). A page whose words disagree
// with each other is corrupt.
//
// A page holds, at offset 0, its index, its sequence and a check word
// (index, sequence and magic mixed); the last 8 bytes of the page repeat the
// check word. Writing those four words dirties the page; the body between
// is not written, so a rewrite costs four stores, not 4 KiB.
//
// The expected sequences live in a separate slice (want); a lost update to
// one of its pages shows up as a page "from the future". MemCheck is not
// safe for concurrent use: one goroutine runs Step (the agent's ticker).
type MemCheck struct {
	mem     []byte   // the working set, len a multiple of PageSize
	want    []uint64 // the sequence last written per page
	hot     int      // pages [0,hot) are rewritten every Step
	seq     uint64   // last sequence written
	wnext   int      // next cold page to rewrite
	cnext   int      // next page to check
	writes  uint64
	checks  uint64
	cycles  uint64 // full passes of the checker over every page
	lost    []MemLoss
	nlost   uint64
	corrupt uint64
}

// MemLoss is one page found wrong.
type MemLoss struct {
	Page int    `json:"page"`
	Want uint64 `json:"want_seq"` // the sequence last written there
	Got  uint64 `json:"got_seq"`  // the sequence found (0 if unreadable)
	Kind string `json:"kind"`     // "stale" (went back in time), "future", "corrupt"
	At   string `json:"at"`       // guest clock when found (RFC 3339)
}

// MemStats is what the checker has done so far.
type MemStats struct {
	Pages   int       `json:"pages"`
	Writes  uint64    `json:"writes"`  // page rewrites
	Checks  uint64    `json:"checks"`  // page checks
	Cycles  uint64    `json:"cycles"`  // full checks of the working set
	Lost    uint64    `json:"lost"`    // stale or future pages: lost updates
	Corrupt uint64    `json:"corrupt"` // pages whose words disagree
	First   []MemLoss `json:"first,omitempty"`
}

const maxLossRecords = 16

// NewMemCheck wraps mem (len a multiple of PageSize) and writes every page
// once. Pages [0,hot) are rewritten on every Step: the hot set stays in the
// guest CPU's TLB, where a missed dirty bit hides (QEMU TCG).
func NewMemCheck(mem []byte, hot int) (*MemCheck, error) {
	if len(mem) == 0 || len(mem)%PageSize != 0 {
		return nil, fmt.Errorf("memcheck: working set of %d bytes is not a whole number of %d-byte pages", len(mem), PageSize)
	}
	n := len(mem) / PageSize
	if hot < 0 || hot > n {
		return nil, fmt.Errorf("memcheck: hot set of %d pages in a working set of %d", hot, n)
	}
	m := &MemCheck{mem: mem, want: make([]uint64, n), hot: hot}
	for i := range n {
		m.write(i)
	}
	return m, nil
}

func checkWord(page int, seq uint64) uint64 {
	x := uint64(page)<<40 ^ seq ^ memMagic
	// splitmix64 finaliser: every bit of page and seq moves the word.
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

func (m *MemCheck) page(i int) []byte { return m.mem[i*PageSize : (i+1)*PageSize] }

func (m *MemCheck) write(i int) {
	m.seq++
	p := m.page(i)
	c := checkWord(i, m.seq)
	binary.LittleEndian.PutUint64(p[0:], uint64(i))
	binary.LittleEndian.PutUint64(p[8:], m.seq)
	binary.LittleEndian.PutUint64(p[16:], c)
	binary.LittleEndian.PutUint64(p[PageSize-8:], c)
	m.want[i] = m.seq
	m.writes++
}

// check verifies page i; a wrong page is recorded and rewritten, so one
// loss is counted once.
func (m *MemCheck) check(i int) {
	m.checks++
	p := m.page(i)
	idx := binary.LittleEndian.Uint64(p[0:])
	seq := binary.LittleEndian.Uint64(p[8:])
	c := binary.LittleEndian.Uint64(p[16:])
	tail := binary.LittleEndian.Uint64(p[PageSize-8:])
	want := m.want[i]
	var kind string
	switch {
	case idx != uint64(i) || c != checkWord(i, seq) || tail != c:
		kind, seq = "corrupt", 0
		m.corrupt++
	case seq < want:
		kind = "stale"
		m.nlost++
	case seq > want:
		kind = "future"
		m.nlost++
	default:
		return
	}
	if len(m.lost) < maxLossRecords {
		m.lost = append(m.lost, MemLoss{Page: i, Want: want, Got: seq, Kind: kind, At: time.Now().UTC().Format(time.RFC3339Nano)})
	}
	m.write(i)
}

// Step checks and rewrites the hot set, rewrites the next cold pages, then
// checks the next pages, each round-robin. A hot page is checked before it
// is rewritten: a loss there would otherwise be written over unseen.
func (m *MemCheck) Step(coldWrites, checks int) {
	n := len(m.want)
	for i := range m.hot {
		m.check(i)
		m.write(i)
	}
	for range coldWrites {
		if m.hot == n {
			break
		}
		if m.wnext < m.hot {
			m.wnext = m.hot
		}
		m.write(m.wnext)
		m.wnext++
		if m.wnext == n {
			m.wnext = m.hot
		}
	}
	for range checks {
		m.check(m.cnext)
		m.cnext++
		if m.cnext == n {
			m.cnext = 0
			m.cycles++
		}
	}
}

// Stats returns the counters and the first losses found.
func (m *MemCheck) Stats() MemStats {
	return MemStats{
		Pages: len(m.want), Writes: m.writes, Checks: m.checks, Cycles: m.cycles,
		Lost: m.nlost, Corrupt: m.corrupt, First: append([]MemLoss(nil), m.lost...),
	}
}

// InjectLoss makes a lost update on purpose: page i is rewritten and then
// put back to its previous content, as a destination that missed the write
// resumes with it. The next check of page i must find it.
func (m *MemCheck) InjectLoss(i int) error {
	if i < 0 || i >= len(m.want) {
		return fmt.Errorf("memcheck: page %d outside the working set of %d pages", i, len(m.want))
	}
	old := append([]byte(nil), m.page(i)...)
	m.write(i)
	copy(m.page(i), old)
	return nil
}
