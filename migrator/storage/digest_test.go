package storage

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestDigestSparseEqualsDense(t *testing.T) {
	dir := t.TempDir()
	sparse, dense := filepath.Join(dir, "s.raw"), filepath.Join(dir, "d.raw")
	const size = 5*DigestChunk + 12345
	f, _ := os.Create(sparse)
	f.Truncate(size)
	f.WriteAt([]byte("hello"), 3*DigestChunk+7)
	f.Close()
	b := make([]byte, size)
	copy(b[3*DigestChunk+7:], "hello")
	os.WriteFile(dense, b, 0o644)

	ds, readS, err := Digest(sparse)
	if err != nil {
		t.Fatal(err)
	}
	dd, readD, err := Digest(dense)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ds, dd) {
		t.Fatal("sparse and dense copies of the same bytes differ")
	}
	if readS >= readD {
		t.Errorf("sparse read %d bytes, dense %d: holes were read", readS, readD)
	}
	// One byte changed anywhere changes the digest.
	for _, off := range []int64{0, 3*DigestChunk + 7, size - 1} {
		c := bytes.Clone(b)
		c[off] ^= 1
		p := filepath.Join(dir, "c.raw")
		os.WriteFile(p, c, 0o644)
		dc, _, _ := Digest(p)
		if bytes.Equal(dc, dd) {
			t.Errorf("flipped byte at %d not detected", off)
		}
	}
	// So does the size.
	os.WriteFile(filepath.Join(dir, "short.raw"), b[:size-1], 0o644)
	if dx, _, _ := Digest(filepath.Join(dir, "short.raw")); bytes.Equal(dx, dd) {
		t.Error("size change not detected")
	}
}
