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

	"github.com/zeebo/xxh3"
)

// The chunked engine copies an image that no hypervisor tracks writes for
// (VirtualBox VDI/VMDK, raw files): rounds of "hash every chunk locally,
// send the chunks whose hash differs from what the destination holds".
// The destination keeps a manifest (its chunk hashes) beside the image, so
// a copy cut off mid-way resumes from what arrived, not from zero. Zero
// chunks travel as a header only.
//
// Pause cost: the final round inside the pause re-hashes the whole image
// locally (reading it: the bytes allocated, holes are free) and sends only
// the chunks changed since the previous round.
//
// Wire format, one connection per round (source -> destination):
//
//	hello:  "VHC1" size(8) chunk(4)
//	reply:  manifest: count(4) then count x 16-byte hashes (zero hash: unknown)
//	then:   records: kind(1) index(8) [len(4) data] ; kind 1 data, 2 zeros, 3 end
//	reply:  after "end": the destination's root digest (32 bytes)
const (
	recData = 1
	recZero = 2
	recEnd  = 3
)

// ChunkedSource is the sending side of the chunked engine.
type ChunkedSource struct {
	Path  string
	Chunk int // bytes; a power of two
}

// RoundStats says what a round did.
type RoundStats struct {
	Chunks, Sent, Zero int   // chunks in the image, sent with data, sent as zeros
	Bytes              int64 // bytes written to the connection
	Root               []byte
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
	hello := append([]byte("VHC1"), binary.BigEndian.AppendUint64(nil, uint64(size))...)
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
	have := make([][16]byte, n)
	for i := range have {
		if _, err := io.ReadFull(r, have[i][:]); err != nil {
			return st, fmt.Errorf("chunked: manifest: %w", err)
		}
	}
	chunks := int((size + int64(s.Chunk) - 1) / int64(s.Chunk))
	st.Chunks = chunks
	h := &Hashes{Path: s.Path, Size: size}
	buf := make([]byte, s.Chunk)
	zero := make([]byte, s.Chunk)
	for i := 0; i < chunks; i++ {
		if err := ctx.Err(); err != nil {
			return st, err
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
		if i < len(have) && have[i] == sum {
			continue
		}
		rec := append([]byte{recData}, binary.BigEndian.AppendUint64(nil, uint64(i))...)
		if hole || bytes.Equal(buf[:k], zero[:k]) {
			rec[0] = recZero
			st.Zero++
			if _, err := w.Write(rec); err != nil {
				return st, err
			}
			continue
		}
		rec = binary.BigEndian.AppendUint32(rec, uint32(k))
		if _, err := w.Write(rec); err != nil {
			return st, err
		}
		if _, err := w.Write(buf[:k]); err != nil {
			return st, err
		}
		st.Sent++
	}
	if _, err := w.Write(append([]byte{recEnd}, make([]byte, 8)...)); err != nil {
		return st, err
	}
	if err := w.Flush(); err != nil {
		return st, err
	}
	st.Bytes = cw.n
	st.Root = h.Root()
	remote := make([]byte, 32)
	if _, err := io.ReadFull(r, remote); err != nil {
		return st, fmt.Errorf("chunked: destination digest: %w", err)
	}
	if !bytes.Equal(remote, st.Root) {
		return st, fmt.Errorf("chunked: digest mismatch after the round: source %x, destination %x", st.Root[:8], remote[:8])
	}
	return st, nil
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
// the manifest at Path+".manifest" so a cut copy resumes.
type ChunkedDest struct {
	Path string
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
	if _, err := io.ReadFull(r, hello); err != nil || string(hello[:4]) != "VHC1" {
		return fmt.Errorf("chunked: bad hello: %v", err)
	}
	size := int64(binary.BigEndian.Uint64(hello[4:]))
	chunk := int(binary.BigEndian.Uint32(hello[12:]))
	if chunk <= 0 || chunk > 64<<20 || size < 0 {
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
	out := binary.BigEndian.AppendUint32(nil, uint32(chunks))
	for _, h := range m {
		out = append(out, h[:]...)
	}
	if _, err := conn.Write(out); err != nil {
		return err
	}
	buf := make([]byte, chunk)
	zeroSum := xxh3.Hash128(make([]byte, chunk)).Bytes()
	written := 0
	for {
		hdr := make([]byte, 9)
		if _, err := io.ReadFull(r, hdr); err != nil {
			d.saveManifest(m)
			return fmt.Errorf("chunked: cut: %w", err)
		}
		i := int(binary.BigEndian.Uint64(hdr[1:]))
		if hdr[0] == recEnd {
			break
		}
		if i < 0 || i >= chunks {
			return fmt.Errorf("chunked: chunk %d out of range", i)
		}
		off := int64(i) * int64(chunk)
		k := int(min(int64(chunk), size-off))
		switch hdr[0] {
		case recZero:
			if err := punch(f, off, int64(k)); err != nil {
				return err
			}
			if k == chunk {
				m[i] = zeroSum
			} else {
				m[i] = xxh3.Hash128(make([]byte, k)).Bytes()
			}
		case recData:
			var n uint32
			if err := binary.Read(r, binary.BigEndian, &n); err != nil || int(n) != k {
				d.saveManifest(m)
				return fmt.Errorf("chunked: chunk %d: length %d, want %d (%v)", i, n, k, err)
			}
			if _, err := io.ReadFull(r, buf[:k]); err != nil {
				d.saveManifest(m)
				return fmt.Errorf("chunked: cut in chunk %d: %w", i, err)
			}
			if _, err := f.WriteAt(buf[:k], off); err != nil {
				return err
			}
			m[i] = xxh3.Hash128(buf[:k]).Bytes()
		default:
			return fmt.Errorf("chunked: unknown record %d", hdr[0])
		}
		if written++; written%64 == 0 {
			if err := d.saveManifest(m); err != nil {
				return err
			}
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := d.saveManifest(m); err != nil {
		return err
	}
	// The reply is over what the image holds, re-read: the check is end to end.
	h, err := HashImageChunk(d.Path, chunk)
	if err != nil {
		return err
	}
	_, err = conn.Write(h.Root())
	return err
}

func punch(f *os.File, off, n int64) error { return fallocatePunch(f, off, n) }
