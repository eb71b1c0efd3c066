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

// Hashes are an image's chunk hashes: the digest can be brought up to date
// by re-hashing only the chunks that changed.
type Hashes struct {
	Path  string
	Size  int64
	Chunk [][16]byte
	Read  int64 // bytes read so far (holes cost nothing)
}

// HashImage hashes every chunk of the image at path (holes read as zeros,
// so a sparse copy and a dense one of the same bytes agree).
func HashImage(path string) (*Hashes, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	h := &Hashes{Path: path, Size: st.Size(), Chunk: make([][16]byte, (st.Size()+DigestChunk-1)/DigestChunk)}
	all := make([]int64, len(h.Chunk))
	for i := range all {
		all[i] = int64(i)
	}
	return h, h.Update(all)
}

// Update re-hashes the given chunks.
func (h *Hashes) Update(chunks []int64) error {
	f, err := os.Open(h.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, DigestChunk)
	for _, c := range chunks {
		off := c * DigestChunk
		if c < 0 || off >= h.Size {
			continue
		}
		n := min(DigestChunk, h.Size-off)
		if hole, err := isHole(f, off, n); err == nil && hole {
			if n == DigestChunk {
				h.Chunk[c] = zeroChunk.Bytes()
			} else {
				h.Chunk[c] = xxh3.Hash128(make([]byte, n)).Bytes()
			}
			continue
		}
		if _, err := f.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("digest %s at %d: %w", h.Path, off, err)
		}
		h.Read += n
		h.Chunk[c] = xxh3.Hash128(buf[:n]).Bytes()
	}
	return nil
}

// Root is the image digest: SHA-256 over the size and every chunk hash.
func (h *Hashes) Root() []byte {
	root := sha256.New()
	binary.Write(root, binary.LittleEndian, h.Size)
	for _, c := range h.Chunk {
		root.Write(c[:])
	}
	return root.Sum(nil)
}

// Digest hashes the whole image at path; returns the digest and the bytes read.
func Digest(path string) ([]byte, int64, error) {
	h, err := HashImage(path)
	if err != nil {
		return nil, 0, err
	}
	return h.Root(), h.Read, nil
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

// Allocated returns how many bytes of the image at path hold data (its
// holes excluded), as SEEK_DATA/SEEK_HOLE see it.
func Allocated(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	var n int64
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return 0, err
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return 0, err
		}
		n += hole - data
		off = hole
	}
	return n, nil
}

// HashImageChunk is HashImage with another chunk size (the chunked engine's).
func HashImageChunk(path string, chunk int) (*Hashes, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := &Hashes{Path: path, Size: st.Size()}
	buf := make([]byte, chunk)
	for off := int64(0); off < h.Size; off += int64(chunk) {
		k := min(int64(chunk), h.Size-off)
		if hole, err := isHole(f, off, k); err == nil && hole {
			clear(buf[:k])
		} else if _, err := f.ReadAt(buf[:k], off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		} else {
			h.Read += k
		}
		h.Chunk = append(h.Chunk, xxh3.Hash128(buf[:k]).Bytes())
	}
	return h, nil
}

// fallocatePunch turns [off, off+n) into a hole (zeros without storage).
func fallocatePunch(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
