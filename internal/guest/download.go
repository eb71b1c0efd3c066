package guest

import (
	"net/http"
	"strconv"
	"time"
)

// downloadChunk is what one write of a download carries.
const downloadChunk = 16 << 10

// Download serves GET /download?rate=R&bytes=N: a stream of N bytes
// (0 or absent: until the client closes) paced at R bytes per second
// (0 or absent: as fast as TCP takes them). It is a bulk transfer in
// flight while the VM moves (labrun.Load.BulkRate). The bytes are a
// repeating pattern (byte i is i mod 251), so a client can check them.
// Bad parameters: 400.
func Download(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	rate, err1 := parseNonNeg(q.Get("rate"))
	total, err2 := parseNonNeg(q.Get("bytes"))
	if err1 != nil || err2 != nil {
		http.Error(w, "want rate=BYTES_PER_SECOND and bytes=N, both >= 0", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	if total > 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(total, 10))
	}
	buf := make([]byte, downloadChunk+251)
	for i := range buf {
		buf[i] = byte(i % 251)
	}
	fl, _ := w.(http.Flusher)
	start := time.Now()
	var sent int64
	for total == 0 || sent < total {
		n := int64(downloadChunk)
		if total > 0 {
			n = min(n, total-sent)
		}
		if rate > 0 {
			// Sleep until this chunk is due: sent bytes at rate.
			if due := start.Add(time.Duration(float64(sent) / float64(rate) * float64(time.Second))); time.Until(due) > 0 {
				select {
				case <-r.Context().Done():
					return
				case <-time.After(time.Until(due)):
				}
			}
		}
		off := sent % 251
		if _, err := w.Write(buf[off : off+n]); err != nil {
			return
		}
		if fl != nil && rate > 0 {
			fl.Flush()
		}
		sent += n
	}
}

func parseNonNeg(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err == nil && v < 0 {
		err = strconv.ErrRange
	}
	return v, err
}
