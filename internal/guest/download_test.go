package guest

import (
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// TestDownload: exactly the bytes asked for, in the checkable pattern,
// paced at the rate asked for; bad parameters are refused.
func TestDownload(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(Download))
	defer srv.Close()
	t0 := time.Now()
	resp, err := http.Get(srv.URL + "/download?bytes=100000&rate=200000")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(t0)
	if err != nil || len(b) != 100000 {
		t.Fatalf("read %d bytes, err %v", len(b), err)
	}
	for i, c := range b {
		if c != byte(i%251) {
			t.Fatalf("byte %d is %d, want %d", i, c, i%251)
		}
	}
	// 100000 bytes at 200000 B/s: the last 16 KiB chunk is due at ~0.42 s.
	if took < 350*time.Millisecond || took > 3*time.Second {
		t.Errorf("took %v, want about 0.42 s at 200000 B/s", took)
	}
	for _, q := range []string{"rate=-1", "bytes=x"} {
		resp, err := http.Get(srv.URL + "/download?" + q)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", q, resp.StatusCode)
		}
	}
}
