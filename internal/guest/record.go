// Package guest holds what runs inside the lab's test VM (the agent behind
// cmd/vmhop-guest) and what the host needs to check its work: the on-disk
// record format and its verifier.
//
// The agent appends records to its raw virtio disk, one 4 KiB block each,
// and acknowledges a record only after the write returned with O_DSYNC. A
// verifier given the highest acknowledged sequence number proves no
// acknowledged write was lost: every record up to it is in its slot, intact.
package guest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
)

// RecordSize is one record: a block, so each write is whole and aligned.
const RecordSize = 4096

var magic = [8]byte{'V', 'M', 'H', 'O', 'P', 'R', 'E', 'C'}

// BootID identifies one boot of the guest (the kernel's random boot_id).
type BootID [16]byte

// ParseBootID reads the kernel's text form, e.g. "5f0e...-...".
func ParseBootID(s string) (BootID, error) {
	var id BootID
	b, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(s), "-", ""))
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("boot id %q: not 16 hex bytes", s)
	}
	copy(id[:], b)
	return id, nil
}

func (id BootID) String() string { return hex.EncodeToString(id[:]) }

// Record is one acknowledged-or-not write of the disk writer.
type Record struct {
	Seq  uint64 // 1, 2, 3, ... within one boot
	Boot BootID
	Time int64 // guest clock, unix nanoseconds (informational: guest clocks drift)
}

// Layout of a record block:
//
//	0   magic "VMHOPREC"
//	8   seq (little endian)
//	16  boot id
//	32  time
//	40  filler derived from seq, so a block of a neighbour cannot pass
//	4064 SHA-256 of bytes 0..4063
const sumOff = RecordSize - sha256.Size

// Marshal renders r into a RecordSize block.
func (r Record) Marshal() []byte {
	b := make([]byte, RecordSize)
	r.MarshalTo(b)
	return b
}

// MarshalTo renders r into b, which must be at least RecordSize long.
func (r Record) MarshalTo(b []byte) {
	copy(b[0:8], magic[:])
	binary.LittleEndian.PutUint64(b[8:], r.Seq)
	copy(b[16:32], r.Boot[:])
	binary.LittleEndian.PutUint64(b[32:], uint64(r.Time))
	x := r.Seq*0x9E3779B97F4A7C15 + 1
	for i := 40; i < sumOff; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
	sum := sha256.Sum256(b[:sumOff])
	copy(b[sumOff:RecordSize], sum[:])
}

// ParseRecord reads a block. ok is false for anything that is not an intact
// record (never written, torn, or corrupted).
func ParseRecord(b []byte) (r Record, ok bool) {
	if len(b) < RecordSize || !bytes.Equal(b[:8], magic[:]) {
		return r, false
	}
	sum := sha256.Sum256(b[:sumOff])
	if !bytes.Equal(sum[:], b[sumOff:RecordSize]) {
		return r, false
	}
	r.Seq = binary.LittleEndian.Uint64(b[8:])
	copy(r.Boot[:], b[16:32])
	r.Time = int64(binary.LittleEndian.Uint64(b[32:]))
	return r, true
}

// Log is where records live: Slots blocks from byte Offset of the disk.
// Record seq goes to slot seq % Slots, so the log wraps around.
type Log struct {
	Offset int64
	Slots  uint64
}

// At returns the byte offset of seq's slot.
func (l Log) At(seq uint64) int64 { return l.Offset + int64(seq%l.Slots)*RecordSize }

// Report is the verifier's finding.
type Report struct {
	Acked   uint64   // verified up to this sequence number
	Checked uint64   // records expected (the ones still in the log after wrapping)
	Missing []uint64 // acknowledged records absent or corrupt (first 20)
	Lost    uint64   // how many are missing in all
}

// OK says whether every acknowledged record was found.
func (r Report) OK() bool { return r.Lost == 0 }

func (r Report) String() string {
	if r.OK() {
		return fmt.Sprintf("all %d acknowledged records present (up to seq %d)", r.Checked, r.Acked)
	}
	return fmt.Sprintf("%d of %d acknowledged records lost (up to seq %d), first: %v", r.Lost, r.Checked, r.Acked, r.Missing)
}

// Verify checks that every record of boot up to acked is intact in disk. A
// slot may instead hold a later lap's record (seq + k*Slots): that is the log
// wrapping, not a loss.
func (l Log) Verify(disk io.ReaderAt, boot BootID, acked uint64) (Report, error) {
	rep := Report{Acked: acked}
	first := uint64(1)
	if acked > l.Slots {
		first = acked - l.Slots + 1
	}
	buf := make([]byte, RecordSize)
	for seq := first; seq <= acked && acked > 0; seq++ {
		rep.Checked++
		if _, err := disk.ReadAt(buf, l.At(seq)); err != nil {
			return rep, fmt.Errorf("read slot of seq %d: %w", seq, err)
		}
		r, ok := ParseRecord(buf)
		if ok && r.Boot == boot && r.Seq >= seq && (r.Seq-seq)%l.Slots == 0 {
			continue
		}
		rep.Lost++
		if len(rep.Missing) < 20 {
			rep.Missing = append(rep.Missing, seq)
		}
	}
	return rep, nil
}
