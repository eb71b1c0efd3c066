package guest

import (
	"bytes"
	"testing"
)

type memDisk []byte

func (m memDisk) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }

func TestRecordRoundTrip(t *testing.T) {
	boot, err := ParseBootID("5f0e4c2a-1b3d-4e5f-8a9b-0c1d2e3f4a5b")
	if err != nil {
		t.Fatal(err)
	}
	r := Record{Seq: 42, Boot: boot, Time: 1234567890}
	b := r.Marshal()
	if len(b) != RecordSize || !bytes.HasPrefix(b, []byte("VMHOPREC")) {
		t.Fatalf("bad block header % x", b[:16])
	}
	got, ok := ParseRecord(b)
	if !ok || got != r {
		t.Fatalf("ParseRecord = %+v, %v", got, ok)
	}
	for _, off := range []int{0, 8, 20, 100, RecordSize - 1} {
		c := bytes.Clone(b)
		c[off] ^= 1
		if _, ok := ParseRecord(c); ok {
			t.Errorf("flipped bit at %d not detected", off)
		}
	}
	if _, ok := ParseRecord(make([]byte, RecordSize)); ok {
		t.Error("zero block parsed as a record")
	}
}

func TestLogVerify(t *testing.T) {
	boot := BootID{1}
	other := BootID{2}
	l := Log{Offset: 8192, Slots: 8}
	disk := make(memDisk, 8192+8*RecordSize)
	write := func(seq uint64, b BootID) { Record{Seq: seq, Boot: b}.MarshalTo(disk[l.At(seq):]) }

	for s := uint64(1); s <= 5; s++ {
		write(s, boot)
	}
	if rep, _ := l.Verify(disk, boot, 5); !rep.OK() || rep.Checked != 5 {
		t.Fatalf("all present: %v", rep)
	}
	if rep, _ := l.Verify(disk, boot, 6); rep.OK() || rep.Missing[0] != 6 {
		t.Fatalf("unwritten seq 6 not reported: %v", rep)
	}
	if rep, _ := l.Verify(disk, other, 3); rep.Lost != 3 {
		t.Fatalf("records of another boot accepted: %v", rep)
	}
	// Wrap: seqs 1..13 written; slots hold 6..13; verifying up to 13 checks 6..13.
	for s := uint64(6); s <= 13; s++ {
		write(s, boot)
	}
	if rep, _ := l.Verify(disk, boot, 13); !rep.OK() || rep.Checked != 8 {
		t.Fatalf("after wrap: %v", rep)
	}
	// A later lap in a slot is fine; an older one (a lost write) is not.
	write(4, boot) // slot of 12 now holds 4: the write of 12 was lost
	rep, _ := l.Verify(disk, boot, 13)
	if rep.Lost != 1 || rep.Missing[0] != 12 {
		t.Fatalf("lost write of 12 not found: %v", rep)
	}
}
