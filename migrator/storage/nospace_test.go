package storage

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestChunkedSyncDiskFull: the destination's disk fills during the bulk
// round (a write fails with ENOSPC after 8 MiB): Converge stops at once
// with ErrNoSpace naming the destination's image, instead of redialling
// for Retry and reporting a lost connection.
func TestChunkedSyncDiskFull(t *testing.T) {
	var written atomic.Int64
	orig := writeAt
	writeAt = func(f *os.File, b []byte, off int64) (int, error) {
		if written.Add(int64(len(b))) > 8*mib {
			return 0, &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
		}
		return f.WriteAt(b, off)
	}
	t.Cleanup(func() { writeAt = orig })
	s, _ := newSync(t, 32*mib)
	s.Retry = time.Minute
	t0 := time.Now()
	err := s.Converge(context.Background(), nil)
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), s.Dest.Path) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("converge on a full disk: %v", err)
	}
	if took := time.Since(t0); took > 20*time.Second {
		t.Fatalf("gave up after %s: it retried", took)
	}
	t.Logf("error: %v (after %d cut(s))", err, s.Cuts())
}
