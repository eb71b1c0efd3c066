package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

const mib = 1 << 20

func randomAt(t *testing.T, path string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	rand.Read(b)
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// round runs one round between a source and a destination over an
// in-memory connection; cutAfter > 0 breaks it after that many bytes.
func round(t *testing.T, src *ChunkedSource, dst *ChunkedDest, cutAfter int64) (RoundStats, error, error) {
	t.Helper()
	a, b := net.Pipe()
	var derr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); derr = dst.Serve(b); b.Close() }()
	var conn interface {
		Read([]byte) (int, error)
		Write([]byte) (int, error)
	} = a
	if cutAfter > 0 {
		conn = &cutter{Conn: a, left: cutAfter}
	}
	st, err := src.Round(context.Background(), conn)
	a.Close()
	wg.Wait()
	return st, err, derr
}

type cutter struct {
	net.Conn
	left int64
}

func (c *cutter) Write(p []byte) (int, error) {
	if int64(len(p)) > c.left {
		n, _ := c.Conn.Write(p[:c.left])
		c.Conn.Close()
		return n, errors.New("wan cut")
	}
	c.left -= int64(len(p))
	return c.Conn.Write(p)
}

func setupImage(t *testing.T) (*ChunkedSource, *ChunkedDest) {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.vdi")
	f, _ := os.Create(src)
	f.Truncate(64 * mib)
	f.Close()
	randomAt(t, src, 8*mib, 16*mib)
	return &ChunkedSource{Path: src, Chunk: mib}, &ChunkedDest{Path: filepath.Join(dir, "copy.vdi")}
}

func TestChunkedRounds(t *testing.T) {
	src, dst := setupImage(t)
	st, err, derr := round(t, src, dst, 0)
	if err != nil || derr != nil {
		t.Fatalf("bulk: %v / %v", err, derr)
	}
	if st.Sent != 16 || st.Zero != 48 || st.Bytes > 16*mib+64<<10 {
		t.Fatalf("bulk: %+v", st)
	}
	// A local process keeps writing while delta rounds run.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		f, _ := os.OpenFile(src.Path, os.O_WRONLY, 0)
		defer f.Close()
		b := make([]byte, 4096)
		for i := int64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			rand.Read(b)
			f.WriteAt(b, (i*4096*37)%(60*mib))
			time.Sleep(time.Millisecond)
		}
	}()
	for r := 0; r < 3; r++ {
		st, err, derr = round(t, src, dst, 0)
		// Rounds while the writer runs may see a chunk change under them:
		// a mismatch is reported, never ignored; the final round decides.
		t.Logf("delta round %d: sent %d chunks, %d KiB, err %v", r, st.Sent, st.Bytes>>10, err)
		_ = derr
	}
	close(stop)
	wg.Wait()
	// The final round, "inside the pause": nothing writes.
	st, err, derr = round(t, src, dst, 0)
	if err != nil || derr != nil {
		t.Fatalf("final: %v / %v", err, derr)
	}
	t.Logf("final round: sent %d chunks, %d KiB", st.Sent, st.Bytes>>10)
	a, _, _ := Digest(src.Path)
	b, _, _ := Digest(dst.Path)
	if !bytes.Equal(a, b) {
		t.Fatal("images differ after the final round")
	}
	// Nothing changed: the next round sends nothing.
	if st, err, _ := round(t, src, dst, 0); err != nil || st.Sent != 0 || st.Zero != 0 {
		t.Fatalf("idle round: %+v %v", st, err)
	}
}

func TestChunkedResumesAfterCut(t *testing.T) {
	src, dst := setupImage(t)
	st1, err, derr := round(t, src, dst, 6*mib)
	if err == nil || derr == nil {
		t.Fatalf("cut round succeeded: %v / %v", err, derr)
	}
	st2, err, derr := round(t, src, dst, 0)
	if err != nil || derr != nil {
		t.Fatalf("resumed round: %v / %v", err, derr)
	}
	total := 6*mib + st2.Bytes
	t.Logf("cut after 6 MiB; the resumed round sent %d chunks, %d KiB; %d KiB in all for 16 MiB of data", st2.Sent, st2.Bytes>>10, total>>10)
	if st2.Sent > 16-4 || float64(total) > 1.1*16*mib {
		t.Fatalf("resumed from zero? first %+v, second %+v", st1, st2)
	}
	a, _, _ := Digest(src.Path)
	b, _, _ := Digest(dst.Path)
	if !bytes.Equal(a, b) {
		t.Fatal("images differ after the resumed copy")
	}
}

// TestChunkedRepeatedAndCompressible: chunks the destination already holds
// travel as copy instructions, compressible ones as LZ4, and the image
// arrives exact.
func TestChunkedRepeatedAndCompressible(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.raw")
	f, _ := os.Create(path)
	f.Truncate(16 * mib)
	a := make([]byte, mib)
	rand.Read(a)
	for _, c := range []int64{0, 5, 6, 7} {
		f.WriteAt(a, c*mib)
	}
	text := bytes.Repeat([]byte("acknowledged record 0042, checksum ok\n"), mib/38+1)[:mib]
	f.WriteAt(text, 10*mib)
	f.Close()
	src := &ChunkedSource{Path: path, Chunk: mib, Compress: true}
	dst := &ChunkedDest{Path: filepath.Join(dir, "copy.raw")}
	st, err, derr := round(t, src, dst, 0)
	if err != nil || derr != nil {
		t.Fatalf("round: %v / %v", err, derr)
	}
	t.Logf("%+v", st)
	if st.Sent != 2 || st.Copied != 3 || st.Compressed != 1 || st.Zero != 11 || st.Bytes > mib+mib/8 {
		t.Fatalf("want 2 sent (1 as LZ4), 3 copies, 11 zeros in about 1 MiB: %+v", st)
	}
	x, _, _ := Digest(path)
	y, _, _ := Digest(dst.Path)
	if !bytes.Equal(x, y) {
		t.Fatal("images differ")
	}
}

// TestChunkedCopyIsChecked: a copy instruction whose source chunk does not
// hold what the source expects (the destination image changed behind the
// manifest) fails the round instead of spreading the damage.
func TestChunkedCopyIsChecked(t *testing.T) {
	src, dst := setupImage(t)
	if _, err, derr := round(t, src, dst, 0); err != nil || derr != nil {
		t.Fatalf("bulk: %v / %v", err, derr)
	}
	in, _ := os.ReadFile(src.Path)
	randomAt(t, dst.Path, 8*mib, 4096) // damage chunk 8 at the destination
	f, _ := os.OpenFile(src.Path, os.O_WRONLY, 0)
	f.WriteAt(in[8*mib:9*mib], 40*mib) // chunk 40 becomes a copy of chunk 8
	f.Close()
	st, err, derr := round(t, src, dst, 0)
	if st.Copied != 1 || derr == nil || err == nil {
		t.Fatalf("round with a damaged copy source: %+v, %v / %v", st, err, derr)
	}
	t.Logf("refused: %v", derr)
}

// TestChunkedDestRejectsGarbage: malformed records end the round with an
// error naming what was wrong, never a panic or a write out of range.
func TestChunkedDestRejectsGarbage(t *testing.T) {
	dst := &ChunkedDest{Path: filepath.Join(t.TempDir(), "copy.raw")}
	hello := append([]byte("VHC2"), 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x10, 0, 0) // 4 MiB, 1 MiB chunks
	for name, rec := range map[string][]byte{
		"out of range": {recData, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 1, 0},
		"bad length":   {recData, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0},
		"bad kind":     {77, 0, 0, 0, 0, 0, 0, 0, 1},
		"bad lz4":      {recLZ4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0xff, 0xff, 0xff},
		"bad hello":    nil,
	} {
		in := append(append([]byte{}, hello...), rec...)
		if rec == nil {
			in = []byte("VHC9........xxxx")
		}
		err := dst.Serve(&rw{r: bytes.NewReader(in)})
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
		t.Logf("%s: %v", name, err)
	}
}

type rw struct {
	r   *bytes.Reader
	out bytes.Buffer
}

func (c *rw) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *rw) Write(p []byte) (int, error) { return c.out.Write(p) }
