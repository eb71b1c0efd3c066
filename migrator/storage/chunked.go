package storage

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/pierrec/lz4/v4"
	"github.com/zeebo/xxh3"
)

// The chunked engine copies an image that no hypervisor tracks writes for
// (VirtualBox VDI/VMDK, raw files): rounds of "hash every chunk locally,
// send the chunks whose hash differs from what the destination holds".
// The destination keeps a manifest (its chunk hashes) beside the image, so
// a copy cut off mid-way resumes from what arrived, not from zero.
//
// What travels for a chunk the destination lacks, cheapest first: a zero
// chunk as a header (a hole at the destination); a chunk the destination
// already holds elsewhere as a copy instruction (its hash is checked there
// before use); an LZ4 block where that saves an eighth; else the bytes.
//
// Pause cost: the final round inside the pause re-hashes the whole source
// image locally (holes are free) and sends only the chunks changed since
// the previous round; the destination reads back only what it wrote.
//
// Wire format, one connection per round (source -> destination):
//
//	hello:  "VHC2" size(8) chunk(4)
//	reply:  manifest: count(4) then count x 16-byte hashes (zero hash: unknown)
//	then:   records: kind(1) index(8), then by kind:
//	        data: len(4) bytes | zero: - | end: - | copy: from(8) hash(16) | lz4: len(4) block
//	reply:  after "end": the destination's root digest (32 bytes), over its
//	        manifest once every chunk written was read back and matched it
const (
	recData = 1
	recZero = 2
	recEnd  = 3
	recCopy = 4
	recLZ4  = 5
)

// ErrDigestMismatch: the two ends disagree about the image after a round.
// Not a transport failure: retrying will not help.
var ErrDigestMismatch = errors.New("digest mismatch")

// ChunkedSource is the sending side of the chunked engine.
type ChunkedSource struct {
	Path     string
	Chunk    int  // bytes; a power of two
	Compress bool // LZ4 chunks where it pays
	// Progress, if set, is called as the round scans the image.
	Progress func(RoundProgress)
}

// RoundProgress is how far a round has come.
type RoundProgress struct {
	Scanned, Chunks int   // chunks hashed so far, in the image
	Bytes           int64 // written to the connection so far
}

// RoundStats says what a round did.
type RoundStats struct {
	Chunks                         int   // chunks in the image
	Sent, Zero, Copied, Compressed int   // chunks sent: with data (Compressed of them as LZ4), as zeros, as copies
	Bytes                          int64 // bytes written to the connection
	Root                           []byte
}

// Round runs one round over conn: the destination says what it holds, the
// source sends what differs, and both report their digest (the source's
// root is over its hashes taken in this round).
func (s *ChunkedSource) Round(ctx context.Context, conn io.ReadWriter) (RoundStats, error) {
	var st RoundStats
	f, err := os.Open(s.Path)
	if err != nil {
		return st, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return st, err
	}
	size := fi.Size()
	cw := &countWriter{w: conn}
	w := bufio.NewWriterSize(cw, 1<<20)
	hello := append([]byte("VHC2"), binary.BigEndian.AppendUint64(nil, uint64(size))...)
	hello = binary.BigEndian.AppendUint32(hello, uint32(s.Chunk))
	if _, err := w.Write(hello); err != nil {
		return st, err
	}
	if err := w.Flush(); err != nil {
		return st, err
	}
	r := bufio.NewReader(conn)
	var n uint32
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return st, fmt.Errorf("chunked: manifest: %w", err)
	}
	chunks := int((size + int64(s.Chunk) - 1) / int64(s.Chunk))
	if int(n) != chunks {
		return st, fmt.Errorf("chunked: destination manifest has %d chunks, the image %d", n, chunks)
	}
	have := make([][16]byte, n)
	for i := range have {
		if _, err := io.ReadFull(r, have[i][:]); err != nil {
			return st, fmt.Errorf("chunked: manifest: %w", err)
		}
	}
	st.Chunks = chunks
	full := func(i int) bool { return int64(i+1)*int64(s.Chunk) <= size }
	// where: a full chunk the destination holds, by hash, kept true as
	// records change what it holds.
	where := map[[16]byte]int{}
	for i, h := range have {
		if h != ([16]byte{}) && full(i) {
			where[h] = i
		}
	}
	h := &Hashes{Path: s.Path, Size: size}
	buf := make([]byte, s.Chunk)
	zbuf := make([]byte, lz4.CompressBlockBound(s.Chunk))
	var lzc lz4.Compressor
	for i := 0; i < chunks; i++ {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		if s.Progress != nil && i%16 == 0 {
			s.Progress(RoundProgress{Scanned: i, Chunks: chunks, Bytes: cw.n + int64(w.Buffered())})
		}
		off := int64(i) * int64(s.Chunk)
		k := int(min(int64(s.Chunk), size-off))
		hole, _ := isHole(f, off, int64(k))
		if hole {
			clear(buf[:k])
		} else if _, err := f.ReadAt(buf[:k], off); err != nil && !errors.Is(err, io.EOF) {
			return st, err
		}
		sum := xxh3.Hash128(buf[:k]).Bytes()
		h.Chunk = append(h.Chunk, sum)
		if have[i] == sum {
			continue
		}
		rec := append([]byte{recData}, binary.BigEndian.AppendUint64(nil, uint64(i))...)
		j, dup := where[sum]
		switch {
		case hole || allZero(buf[:k]):
			rec[0] = recZero
			st.Zero++
		case dup && full(i):
			rec[0] = recCopy
			rec = binary.BigEndian.AppendUint64(rec, uint64(j))
			rec = append(rec, sum[:]...)
			st.Copied++
		default:
			st.Sent++
			data := buf[:k]
			if s.Compress {
				if z, err := lzc.CompressBlock(buf[:k], zbuf); err == nil && z > 0 && z <= k-k/8 {
					rec[0], data = recLZ4, zbuf[:z]
					st.Compressed++
				}
			}
			rec = binary.BigEndian.AppendUint32(rec, uint32(len(data)))
			rec = append(rec, data...)
		}
		if _, err := w.Write(rec); err != nil {
			return st, err
		}
		if where[have[i]] == i {
			delete(where, have[i])
		}
		have[i] = sum
		if full(i) {
			where[sum] = i
		}
	}
	if _, err := w.Write(append([]byte{recEnd}, make([]byte, 8)...)); err != nil {
		return st, err
	}
	if err := w.Flush(); err != nil {
		return st, err
	}
	st.Bytes = cw.n
	st.Root = h.Root()
	if s.Progress != nil {
		s.Progress(RoundProgress{Scanned: chunks, Chunks: chunks, Bytes: cw.n})
	}
	remote := make([]byte, 32)
	if _, err := io.ReadFull(r, remote); err != nil {
		return st, fmt.Errorf("chunked: destination digest: %w", err)
	}
	if !bytes.Equal(remote, st.Root) {
		return st, fmt.Errorf("chunked: %w after the round: source %x, destination %x", ErrDigestMismatch, st.Root[:8], remote[:8])
	}
	return st, nil
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// ChunkedDest is the receiving side: it writes chunks into Path and keeps
// the manifest at Path+".manifest" so a cut copy resumes. One ChunkedDest
// serves the rounds of one migration, one round at a time.
type ChunkedDest struct {
	Path string

	// verified[i]: chunk i was read back from the image after a round and
	// matched the manifest; later rounds re-read only what they wrote.
	verified []bool
}

func (d *ChunkedDest) manifestPath() string { return d.Path + ".manifest" }

func (d *ChunkedDest) loadManifest(chunks int) [][16]byte {
	m := make([][16]byte, chunks)
	b, err := os.ReadFile(d.manifestPath())
	if err != nil {
		return m
	}
	for i := 0; i < chunks && (i+1)*16 <= len(b); i++ {
		copy(m[i][:], b[i*16:])
	}
	return m
}

func (d *ChunkedDest) saveManifest(m [][16]byte) error {
	b := make([]byte, 0, len(m)*16)
	for _, h := range m {
		b = append(b, h[:]...)
	}
	tmp := d.manifestPath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, d.manifestPath())
}

// Serve handles one round on conn. A chunk enters the manifest only after
// it was written, and the manifest is saved every 64 chunks and at the end,
// so after a cut it never claims a chunk the image does not hold.
func (d *ChunkedDest) Serve(conn io.ReadWriter) error {
	r := bufio.NewReaderSize(conn, 1<<20)
	hello := make([]byte, 16)
	if _, err := io.ReadFull(r, hello); err != nil || string(hello[:4]) != "VHC2" {
		return fmt.Errorf("chunked: bad hello %q: %v", hello[:4], err)
	}
	size := int64(binary.BigEndian.Uint64(hello[4:]))
	chunk := int(binary.BigEndian.Uint32(hello[12:]))
	if chunk < 512 || chunk > 64<<20 || chunk&(chunk-1) != 0 || size < 0 || size > 1<<50 {
		return fmt.Errorf("chunked: bad hello: chunk %d size %d", chunk, size)
	}
	chunks := int((size + int64(chunk) - 1) / int64(chunk))
	f, err := os.OpenFile(d.Path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	m := d.loadManifest(chunks)
	if len(d.verified) != chunks {
		d.verified = make([]bool, chunks)
	}
	out := binary.BigEndian.AppendUint32(nil, uint32(chunks))
	for _, h := range m {
		out = append(out, h[:]...)
	}
	if _, err := conn.Write(out); err != nil {
		return err
	}
	buf := make([]byte, chunk)
	zbuf := make([]byte, lz4.CompressBlockBound(chunk))
	written := 0
	// fail keeps what arrived: the manifest is saved on every way out.
	fail := func(err error) error {
		d.saveManifest(m)
		return fmt.Errorf("chunked: %w", err)
	}
	for {
		hdr := make([]byte, 9)
		if _, err := io.ReadFull(r, hdr); err != nil {
			return fail(fmt.Errorf("connection cut: %w", err))
		}
		i := int(binary.BigEndian.Uint64(hdr[1:]))
		if hdr[0] == recEnd {
			break
		}
		if i < 0 || i >= chunks {
			return fail(fmt.Errorf("record kind %d: chunk %d out of range (image has %d)", hdr[0], i, chunks))
		}
		off := int64(i) * int64(chunk)
		k := int(min(int64(chunk), size-off))
		switch hdr[0] {
		case recZero:
			if err := punch(f, off, int64(k)); err != nil {
				return fail(err)
			}
			clear(buf[:k])
		case recData, recLZ4:
			var n uint32
			if err := binary.Read(r, binary.BigEndian, &n); err != nil {
				return fail(err)
			}
			if hdr[0] == recData && int(n) != k || int(n) > len(zbuf) {
				return fail(fmt.Errorf("chunk %d: record length %d for a %d-byte chunk", i, n, k))
			}
			if hdr[0] == recData {
				if _, err := io.ReadFull(r, buf[:k]); err != nil {
					return fail(err)
				}
			} else {
				if _, err := io.ReadFull(r, zbuf[:n]); err != nil {
					return fail(err)
				}
				if got, err := lz4.UncompressBlock(zbuf[:n], buf[:k]); err != nil || got != k {
					return fail(fmt.Errorf("chunk %d: bad LZ4 block (%d bytes out, want %d): %v", i, got, k, err))
				}
			}
			if _, err := writeAt(f, buf[:k], off); err != nil {
				return fail(noSpace(d.Path, err))
			}
		case recCopy:
			ref := make([]byte, 24)
			if _, err := io.ReadFull(r, ref); err != nil {
				return fail(err)
			}
			j := int64(binary.BigEndian.Uint64(ref))
			if k != chunk || j < 0 || (j+1)*int64(chunk) > size {
				return fail(fmt.Errorf("chunk %d: copy from chunk %d out of range", i, j))
			}
			if _, err := f.ReadAt(buf, j*int64(chunk)); err != nil {
				return fail(err)
			}
			if sum := xxh3.Hash128(buf).Bytes(); !bytes.Equal(sum[:], ref[8:]) {
				return fail(fmt.Errorf("chunk %d: copy from chunk %d, which does not hold the hash the source expects", i, j))
			}
			if _, err := writeAt(f, buf, off); err != nil {
				return fail(noSpace(d.Path, err))
			}
		default:
			return fail(fmt.Errorf("chunk %d: unknown record kind %d", i, hdr[0]))
		}
		m[i] = xxh3.Hash128(buf[:k]).Bytes()
		d.verified[i] = false
		if written++; written%64 == 0 {
			if err := d.saveManifest(m); err != nil {
				return err
			}
		}
	}
	if err := f.Sync(); err != nil {
		return noSpace(d.Path, err)
	}
	// End to end: what the image holds now is read back and must match
	// the manifest the reply is computed over.
	for i := range m {
		if d.verified[i] || m[i] == ([16]byte{}) {
			continue
		}
		off := int64(i) * int64(chunk)
		k := int(min(int64(chunk), size-off))
		if _, err := f.ReadAt(buf[:k], off); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		if xxh3.Hash128(buf[:k]).Bytes() != m[i] {
			m[i] = [16]byte{}
			d.saveManifest(m)
			return fmt.Errorf("chunked: chunk %d reads back different from what was written", i)
		}
		d.verified[i] = true
	}
	if err := d.saveManifest(m); err != nil {
		return err
	}
	_, err = conn.Write((&Hashes{Size: size, Chunk: m}).Root())
	return err
}

func punch(f *os.File, off, n int64) error { return fallocatePunch(f, off, n) }
