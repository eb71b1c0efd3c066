// Package storage moves a VM's disk to the destination while the VM runs
// and proves it arrived exact: QEMU block mirroring to an NBD export on the
// destination (dirty tracking by QEMU itself), and a sparse-aware image
// digest compared at the pause.
package storage

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/zeebo/xxh3"
	"golang.org/x/sys/unix"
)

// DigestChunk is the unit of Digest: each chunk's 128-bit xxh3 goes into a
// SHA-256 over all of them.
const DigestChunk = 1 << 20

var zeroChunk = xxh3.Hash128(make([]byte, DigestChunk))

// Digest hashes the logical content of the image at path (holes read as
// zeros), so a sparse copy and a dense one of the same bytes agree. Holes
// cost nothing: their chunk hash is known. Returns the digest and the bytes
// actually read.
func Digest(path string) ([]byte, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	size := st.Size()
	root := sha256.New()
	binary.Write(root, binary.LittleEndian, size)
	buf := make([]byte, DigestChunk)
	var read int64
	for off := int64(0); off < size; off += DigestChunk {
		n := min(DigestChunk, size-off)
		if hole, err := isHole(f, off, n); err == nil && hole {
			h := zeroChunk
			if n < DigestChunk {
				h = xxh3.Hash128(make([]byte, n))
			}
			b := h.Bytes()
			root.Write(b[:])
			continue
		}
		if _, err := f.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return nil, read, fmt.Errorf("digest %s at %d: %w", path, off, err)
		}
		read += n
		b := xxh3.Hash128(buf[:n]).Bytes()
		root.Write(b[:])
	}
	return root.Sum(nil), read, nil
}

// isHole reports whether [off, off+n) holds no data (SEEK_DATA finds none there).
func isHole(f *os.File, off, n int64) (bool, error) {
	next, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true, nil // no data after off at all
	}
	if err != nil {
		return false, err
	}
	return next >= off+n, nil
}
