package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeQEMU speaks just enough QMP: greeting, capabilities negotiation, then
// for "query-status" an event followed by the reply, and an error for
// anything else.
func fakeQEMU(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		serveQMP(c, func(w *json.Encoder, cmd, id string) bool {
			switch cmd {
			case "qmp_capabilities":
				w.Encode(map[string]any{"return": map[string]any{}, "id": id})
			case "query-status":
				w.Encode(map[string]any{"event": "STOP", "data": map[string]any{}, "timestamp": map[string]any{"seconds": 1, "microseconds": 5}})
				w.Encode(map[string]any{"return": map[string]any{"status": "paused", "running": false}, "id": id})
			case "quit":
				return true
			default:
				w.Encode(map[string]any{"error": map[string]any{"class": "CommandNotFound", "desc": "The command " + cmd + " has not been found"}, "id": id})
			}
			return false
		})
	}()
	return path
}

// serveQMP is a fake QEMU's monitor on c: QMP's greeting, then each
// command's name and id to answer, which writes what QEMU would on w; it
// returns when the client goes or answer says the monitor ends.
func serveQMP(c net.Conn, answer func(w *json.Encoder, cmd, id string) (end bool)) {
	w := json.NewEncoder(c)
	w.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{}}})
	r := bufio.NewScanner(c)
	for r.Scan() {
		var req struct {
			Execute string `json:"execute"`
			ID      string `json:"id"`
		}
		json.Unmarshal(r.Bytes(), &req)
		if answer(w, req.Execute, req.ID) {
			return
		}
	}
}

func TestMonitor(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := Dial(ctx, fakeQEMU(t))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	events, stop := m.Events()
	defer stop()

	var st queryStatus
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	if st.Status != "paused" || st.Running {
		t.Fatalf("status = %+v", st)
	}
	select {
	case ev := <-events:
		if ev.Name != "STOP" || ev.Time != time.Unix(1, 5000) {
			t.Fatalf("event = %+v", ev)
		}
	case <-ctx.Done():
		t.Fatal("no event")
	}

	err = m.Execute(ctx, "frobnicate", nil, nil)
	var qe *Error
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" || qe.Command != "frobnicate" {
		t.Fatalf("err = %v", err)
	}

	// QEMU going away ends the monitor; later commands say so.
	m.Execute(ctx, "quit", nil, nil)
	<-m.Done()
	if err := m.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("after quit: err = %v", err)
	}
}

func TestDialWaitsForSocket(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := Dial(ctx, filepath.Join(t.TempDir(), "absent.sock"))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
}

func TestMachineArgs(t *testing.T) {
	m := Machine{Name: "vm-siteB", MemKiB: 128<<10 + 8, Disk: "/d.raw", QMPSocket: "/q", Tap: "tap-vm", MAC: "52:54:00:01:02:03", Incoming: "defer"}
	a, err := m.Args()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"-m": "131080k", "-incoming": "defer", "-machine": "pc,accel=tcg", "-qmp": "unix:/q,server=on,wait=off"}
	for i := 0; i+1 < len(a); i++ {
		if w, ok := want[a[i]]; ok {
			if a[i+1] != w {
				t.Errorf("%s %s, want %s", a[i], a[i+1], w)
			}
			delete(want, a[i])
		}
	}
	if len(want) > 0 {
		t.Errorf("missing %v in %q", want, a)
	}
	if _, err := (Machine{Name: "x"}).Args(); err == nil {
		t.Error("incomplete machine accepted")
	}
}

// TestExecuteWithFilePassesDescriptor: getfd's descriptor arrives beside
// the command (SCM_RIGHTS) and is a working copy of the caller's file.
func TestExecuteWithFilePassesDescriptor(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		uc := c.(*net.UnixConn)
		w := json.NewEncoder(c)
		w.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{}}})
		buf, oob := make([]byte, 4096), make([]byte, 256)
		for {
			n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			var req struct {
				Execute   string         `json:"execute"`
				ID        string         `json:"id"`
				Arguments map[string]any `json:"arguments"`
			}
			json.Unmarshal(buf[:n], &req)
			if req.Execute == "getfd" {
				msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
				var fds []int
				if len(msgs) == 1 {
					fds, _ = unix.ParseUnixRights(&msgs[0])
				}
				if len(fds) != 1 {
					got <- fmt.Sprintf("%d descriptors", len(fds))
				} else {
					f := os.NewFile(uintptr(fds[0]), "passed")
					f.WriteString("through the copy")
					f.Close()
					got <- fmt.Sprint(req.Arguments["fdname"])
				}
			}
			w.Encode(map[string]any{"return": map[string]any{}, "id": req.ID})
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	r, wr, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := m.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": streamFD}, wr, nil); err != nil {
		t.Fatal(err)
	}
	wr.Close()
	if name := <-got; name != streamFD {
		t.Fatalf("server got %s", name)
	}
	b, _ := io.ReadAll(r)
	if string(b) != "through the copy" {
		t.Fatalf("read %q from the pipe", b)
	}
}
