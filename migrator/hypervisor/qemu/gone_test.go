package qemu

import (
	"context"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestGone: a QMP socket that is missing or refuses connections, with no
// process naming it, is gone (why says which); one that accepts, or a
// missing one that a live process names (a QEMU whose socket file was
// deleted), is not.
func TestGone(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.qmp")
	if gone, why := Gone(missing); !gone || !strings.Contains(why, "is missing") || !strings.Contains(why, missing) {
		t.Errorf("missing socket: %v %q", gone, why)
	}

	stale := filepath.Join(dir, "stale.qmp")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // as a killed QEMU leaves it
	ln.Close()
	if gone, why := Gone(stale); !gone || !strings.Contains(why, "refuses connections") {
		t.Errorf("stale socket: %v %q", gone, why)
	}

	live := filepath.Join(dir, "live.qmp")
	ln, err = net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if gone, why := Gone(live); gone {
		t.Errorf("listening socket: gone (%s)", why)
	}

	// A process whose command line names the (deleted) socket runs on.
	named := filepath.Join(dir, "named.qmp")
	cmd := exec.Command("sleep", "30")
	cmd.Args[0] = "qemu-system-x86_64 -qmp unix:" + named + ",server=on"
	if err := cmd.Start(); err != nil {
		t.Skip("no sleep:", err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	if gone, why := Gone(named); gone || !strings.Contains(why, "names it") {
		t.Errorf("socket named by a live process: %v %q", gone, why)
	}
}

// TestDestinationStatus: the destination QEMU's run state through
// Incoming's query-status; an Incoming that cannot answer is an error.
func TestDestinationStatus(t *testing.T) {
	in := &statusIncoming{status: `{"status":"inmigrate","running":false}`}
	d := New(Config{Incoming: in})
	if st, err := d.DestinationStatus(context.Background()); err != nil || st != "inmigrate" {
		t.Errorf("status: %q %v", st, err)
	}
	in.status = ""
	if st, err := d.DestinationStatus(context.Background()); err == nil {
		t.Errorf("no answer: %q", st)
	}
}

type statusIncoming struct {
	Incoming
	status string
}

func (s *statusIncoming) Query(_ context.Context, req Query) (json.RawMessage, error) {
	if s.status == "" {
		return nil, ErrClosed
	}
	return json.RawMessage(s.status), nil
}
