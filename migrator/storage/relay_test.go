package storage

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// TestRelayNegotiatesForQEMU puts the relay between a real NBD client
// (qemu-io) and a real server (qemu-nbd), on loopback. The relay negotiates
// with the server before the client comes, answers the client's
// negotiation itself, and splices the rest: the writes land in the image,
// its write log names their clusters, and a second client connection (as
// after a cut) gets a new, freshly negotiated WAN connection.
func TestRelayNegotiatesForQEMU(t *testing.T) {
	for _, tool := range []string{"qemu-nbd", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install qemu-utils)", tool)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	f, _ := os.Create(img)
	f.Truncate(16 * mib)
	f.Close()
	nbdPort, wanPort := freePort(t), freePort(t)
	srv := exec.Command("qemu-nbd", "-f", "raw", "-x", "disk0", "-b", "127.0.0.1", "-p", fmt.Sprint(nbdPort), "-t", "-e", "4", img)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	waitListen(t, fmt.Sprintf("127.0.0.1:%d", nbdPort))

	var d net.Dialer
	// The relay's WAN sockets, as dialled: a duplicate of each descriptor
	// keeps its socket options readable after the relay closed it.
	var wanMu sync.Mutex
	var wan []*os.File // (wanMu)
	dialSource := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			f, ferr := c.(*net.TCPConn).File()
			if ferr != nil {
				c.Close()
				return nil, ferr
			}
			t.Cleanup(func() { f.Close() })
			wanMu.Lock()
			wan = append(wan, f)
			wanMu.Unlock()
		}
		return c, err
	}
	// wanPacing is the SO_MAX_PACING_RATE of WAN socket i (-1: the last)
	// and how many there are.
	wanPacing := func(i int) (int, int) {
		wanMu.Lock()
		defer wanMu.Unlock()
		if i < 0 {
			i = len(wan) - 1
		}
		pacing, err := unix.GetsockoptInt(int(wan[i].Fd()), unix.SOL_SOCKET, unix.SO_MAX_PACING_RATE)
		if err != nil {
			t.Fatal(err)
		}
		return pacing, len(wan)
	}
	r := &Relay{
		DialSource: dialSource, DialDest: d.DialContext, ListenDest: net.Listen,
		DestWAN: fmt.Sprintf("127.0.0.1:%d", wanPort), DestNBD: fmt.Sprintf("127.0.0.1:%d", nbdPort),
		SourceSock: filepath.Join(dir, "relay.sock"),
		Limiter:    rate.NewLimiter(rate.Limit(100_000_000), 4*mib), Tuning: WANTuning{Pacing: PacingYield},
	}
	ctx := context.Background()
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	if err := r.Negotiate(ctx, "disk0"); err != nil {
		t.Fatal(err)
	}
	r.ResetTracking()
	// The pause lifts the open WAN socket's pacing (the yield pacer's).
	if pacing, _ := wanPacing(0); pacing != 102_000_000 {
		t.Fatalf("WAN socket paced at %d bytes/s before the pause, want 102000000", pacing)
	}
	if err := r.LiftPacing(); err != nil {
		t.Fatal(err)
	}
	if pacing, _ := wanPacing(0); !unpaced(pacing) {
		t.Fatalf("WAN socket paced at %d bytes/s after LiftPacing, want unlimited", pacing)
	}
	qio := func(cmds ...string) {
		t.Helper()
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		args = append(args, "nbd+unix:///disk0?socket="+r.SourceSock)
		out, err := exec.Command("qemu-io", args...).CombinedOutput()
		if err != nil || bytes.Contains(out, []byte("failed")) || bytes.Contains(out, []byte("Pattern verification")) {
			t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
		}
	}
	t0 := time.Now()
	qio("write -P 0xab 1M 128k", "write -z 4M 64k", "read -P 0xab 1M 128k")
	t.Logf("first client: %s (negotiated locally)", time.Since(t0).Round(time.Millisecond))
	got, _ := os.ReadFile(img)
	if !bytes.Equal(got[1*mib:1*mib+128<<10], bytes.Repeat([]byte{0xab}, 128<<10)) {
		t.Fatal("the write did not reach the image")
	}
	written, followed := r.Written()
	t.Logf("write log %v (followed %v), %d bytes to the destination", written, followed, r.BytesToDest())
	if !followed || fmt.Sprint(written) != "[16 17 64]" || r.BytesToDest() < 128<<10 {
		t.Fatalf("write log %v followed %v", written, followed)
	}
	// A second connection, as QEMU makes after a cut: a new WAN connection,
	// unpaced too (dialled after the lift).
	qio("write -P 0xcd 8M 64k", "read -P 0xcd 8M 64k")
	if r.Reconnects() != 1 {
		t.Fatalf("reconnects %d, want 1", r.Reconnects())
	}
	if pacing, n := wanPacing(-1); n < 2 || !unpaced(pacing) {
		t.Fatalf("%d WAN sockets, the last paced at %d bytes/s after LiftPacing, want unlimited", n, pacing)
	}
	if written, _ := r.Written(); fmt.Sprint(written) != "[16 17 64 128]" {
		t.Fatalf("write log after the second connection: %v", written)
	}
	// The destination's server dies: a client connecting now gets its
	// requests refused at once (EIO), not held for a reconnect.
	srv.Process.Kill()
	srv.Wait()
	t0 = time.Now()
	out, _ := exec.Command("qemu-io", "-f", "raw", "-c", "write -P 0xef 0 64k", "nbd+unix:///disk0?socket="+r.SourceSock).CombinedOutput()
	t.Logf("after the server died (%s): %s", time.Since(t0).Round(time.Millisecond), bytes.TrimSpace(out))
	if !bytes.Contains(out, []byte("Input/output error")) || time.Since(t0) > 5*time.Second {
		t.Fatal("a write with the destination gone did not fail at once with EIO")
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func waitListen(t *testing.T, addr string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %s", addr)
}

// TestDiscFilterDropsOnlyTheGoodbye: the relay passes every NBD request
// byte for byte (a write's payload too, even one that looks like a
// request) except NBD_CMD_DISC, however the stream is cut into writes.
func TestDiscFilterDropsOnlyTheGoodbye(t *testing.T) {
	req := func(typ uint16, n uint32) []byte {
		h := make([]byte, 28)
		binary.BigEndian.PutUint32(h, nbdRequestMagic)
		binary.BigEndian.PutUint16(h[6:], typ)
		binary.BigEndian.PutUint32(h[24:], n)
		return h
	}
	payload := append(req(nbdCmdDisc, 0), bytes.Repeat([]byte{7}, 100)...) // a write whose data looks like a DISC
	var in, want []byte
	for _, part := range [][]byte{req(nbdCmdWrite, uint32(len(payload))), payload, req(3, 0)} { // write, flush
		in, want = append(in, part...), append(want, part...)
	}
	in = append(in, req(nbdCmdDisc, 0)...)
	for _, step := range []int{1, 3, 28, 29, 1000} {
		var out bytes.Buffer
		f := &discFilter{w: &out}
		for rest := in; len(rest) > 0; {
			k := min(step, len(rest))
			if n, err := f.Write(rest[:k]); n != k || err != nil {
				t.Fatalf("step %d: wrote %d, %v", step, n, err)
			}
			rest = rest[k:]
		}
		if !bytes.Equal(out.Bytes(), want) || f.drops != 1 {
			t.Errorf("step %d: %d bytes out (want %d), %d dropped", step, out.Len(), len(want), f.drops)
		}
	}
}
