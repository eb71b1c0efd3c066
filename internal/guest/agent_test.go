package guest

import (
	"bytes"
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

func TestParseMemAvailable(t *testing.T) {
	mi := "MemTotal:         101916 kB\nMemFree:           20176 kB\nMemAvailable:      32348 kB\nBuffers:               0 kB\n"
	if got := parseMemAvailable(mi); got != 32348.0/1024 {
		t.Errorf("MemAvailable = %v MiB", got)
	}
	if got := parseMemAvailable("MemTotal: 1 kB\n"); got != -1 {
		t.Errorf("missing: %v, want -1", got)
	}
}

// freeAddr is a loopback TCP address nothing listens on.
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// dialEcho connects to the echo service at addr, waiting up to half a
// second for it to listen.
func dialEcho(t *testing.T, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	var err error
	for try := 0; try < 50; try++ {
		if c, err = net.Dial("tcp", addr); err == nil {
			return c
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal(err)
	return nil
}

// The echo service sends back every byte, also of a write larger than
// its buffer, and counts its open connections.
func TestEchoTCP(t *testing.T) {
	a := &Agent{cfg: AgentConfig{EchoAddr: freeAddr(t)}}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.serveEchoTCP(ctx) }()
	var conns []net.Conn
	for i := 0; i < 50; i++ {
		conns = append(conns, dialEcho(t, a.cfg.EchoAddr))
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 4*echoBuf) // 4 buffers' worth and more
	for i, c := range conns {
		msg := []byte{byte(i), 'x', '\n'}
		if i == 0 {
			msg = big
		}
		go c.Write(msg)
		got := make([]byte, len(msg))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("conn %d: echo of %d bytes: %v (equal %v)", i, len(msg), err, bytes.Equal(got, msg))
		}
	}
	if n := a.echoConns.Load(); n != 50 {
		t.Errorf("echo_conns = %d with 50 open", n)
	}
	for _, c := range conns {
		c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for a.echoConns.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := a.echoConns.Load(); n != 0 {
		t.Errorf("echo_conns = %d after every client closed", n)
	}
	cancel()
	if err := <-errc; err != context.Canceled {
		t.Errorf("serveEchoTCP after cancel: %v", err)
	}
}

// Out of descriptors, the echo service waits and accepts again: it ends
// only with its context. (It used to return: the agent, the guest's
// init, ended, and with it the guest's kernel.)
func TestEchoTCPSurvivesAcceptFailure(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	a := &Agent{cfg: AgentConfig{EchoAddr: freeAddr(t)}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- a.serveEchoTCP(ctx) }()
	c := dialEcho(t, a.cfg.EchoAddr)
	defer c.Close()
	// Accepted at once. Now every descriptor but one is taken (a low
	// limit, filled with /dev/null), and the next client takes that one:
	// nothing is left for the service to accept it with.
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	low := lim
	low.Cur = uint64(len(fds) + 16)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var filler []*os.File
	release := func() {
		for _, f := range filler {
			f.Close()
		}
		filler = nil
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
	}
	defer release()
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			break
		}
		filler = append(filler, f)
	}
	filler[len(filler)-1].Close()
	filler = filler[:len(filler)-1]
	c2, err := net.Dial("tcp", a.cfg.EchoAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	time.Sleep(200 * time.Millisecond) // accept fails with EMFILE, and again
	release()
	select {
	case err := <-errc:
		t.Fatalf("the echo service ended on a failed accept: %v", err)
	default:
	}
	c2.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c2.Write([]byte("late\n")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := io.ReadFull(c2, got); err != nil || string(got) != "late\n" {
		t.Fatalf("echo after the accept failures: %q, %v", got, err)
	}
}
