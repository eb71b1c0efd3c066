package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// fakeQMPEnv makes the test binary a fake QEMU of its own process: it
// serves QMP on the socket the variable names and exits on "quit", as
// QEMU does when its guest reboots under -no-reboot or it is killed.
const fakeQMPEnv = "VMHOP_TEST_FAKE_QMP"

// FakeQMPChild is the fake QEMU's body when the test binary runs as one
// (fakeQMPEnv set; TestMain calls it first); otherwise it returns.
func FakeQMPChild() {
	path := os.Getenv(fakeQMPEnv)
	if path == "" {
		return
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		os.Exit(2)
	}
	c, err := ln.Accept()
	if err != nil {
		os.Exit(2)
	}
	serveQMP(c, func(w *json.Encoder, cmd, id string) bool {
		switch cmd {
		case "quit":
			os.Exit(0) // no reply: gone, like QEMU whose guest panicked
		case "qmp_capabilities", "blockdev-del":
			w.Encode(map[string]any{"return": map[string]any{}, "id": id})
		default:
			w.Encode(map[string]any{"return": map[string]any{"status": "running"}, "id": id})
		}
		return false
	})
	time.Sleep(time.Hour) // the client went; QEMU runs on (killed by the test's cleanup)
}

// startFakeQEMU runs the fake QEMU process and connects to it.
func startFakeQEMU(t *testing.T) (*Monitor, *exec.Cmd) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fakeQMPEnv+"="+path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, cmd
}

// A monitor whose QEMU exits says so: ErrExited (still ErrClosed), with
// its pid; QEMU's pid is the process serving the socket.
func TestMonitorSaysQEMUExited(t *testing.T) {
	m, cmd := startFakeQEMU(t)
	ctx := context.Background()
	if m.PID() != cmd.Process.Pid {
		t.Fatalf("monitor's pid %d, the fake QEMU's %d", m.PID(), cmd.Process.Pid)
	}
	if err := m.Execute(ctx, "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
	if m.Exited() {
		t.Fatal("Exited while QEMU runs")
	}
	err := m.Execute(ctx, "quit", nil, nil)
	cmd.Wait() // reaped, as QEMU's parent does
	if !errors.Is(err, ErrExited) || !errors.Is(err, ErrClosed) {
		t.Fatalf("quit: %v, want ErrExited", err)
	}
	err = m.Execute(ctx, "query-block-jobs", nil, nil)
	if !errors.Is(err, ErrExited) || !m.Exited() {
		t.Fatalf("after the exit: %v (Exited %v)", err, m.Exited())
	}
	t.Logf("the error: %v", err)
}

// A monitor closed while QEMU runs (ours closed it, or the connection
// broke) is ErrClosed only: what QEMU holds is still there.
func TestMonitorClosedQEMUAlive(t *testing.T) {
	m, _ := startFakeQEMU(t)
	m.Close()
	err := m.Execute(context.Background(), "blockdev-del", nil, nil)
	if !errors.Is(err, ErrClosed) || errors.Is(err, ErrExited) || m.Exited() {
		t.Fatalf("closed, QEMU alive: %v (Exited %v), want ErrClosed alone", err, m.Exited())
	}
}

// The mirror's teardown after its source QEMU exited has nothing to
// remove: not an undo failure (the migration's own error says the VM
// went). While QEMU runs, a monitor that cannot be asked still is one.
func TestMirrorTeardownAfterSourceExited(t *testing.T) {
	m, cmd := startFakeQEMU(t)
	m.Execute(context.Background(), "quit", nil, nil)
	cmd.Wait()
	mr := &Mirror{Src: m, targetAdded: true}
	if err := mr.teardown(context.Background()); err != nil {
		t.Fatalf("teardown after the source exited: %v", err)
	}

	m2, _ := startFakeQEMU(t)
	m2.Close()
	mr2 := &Mirror{Src: m2, targetAdded: true}
	if err := mr2.teardown(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("teardown, QEMU alive, monitor closed: %v, want ErrClosed", err)
	}
}
