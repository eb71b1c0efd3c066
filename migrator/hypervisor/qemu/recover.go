package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

var _ hypervisor.Recoverable = (*Driver)(nil)

// SourceMigrated implements hypervisor.Recoverable: the source's
// migration completed ("completed"), or the source sits in
// "postmigrate" (its state went to the destination).
func (d *Driver) SourceMigrated(ctx context.Context) (bool, error) {
	if err := d.ConnectSource(ctx); err != nil {
		return false, err
	}
	var q queryMigrate
	if err := d.src.Execute(ctx, "query-migrate", nil, &q); err != nil {
		return false, fmt.Errorf("source: query-migrate: %w", err)
	}
	if q.Status == "completed" {
		return true, nil
	}
	var s queryStatus
	if err := d.src.Execute(ctx, "query-status", nil, &s); err != nil {
		return false, fmt.Errorf("source: query-status: %w", err)
	}
	return s.Status == "postmigrate", nil
}

// CancelMigration implements hypervisor.Recoverable: migrate_cancel
// (QEMU accepts it with no migration running).
func (d *Driver) CancelMigration(ctx context.Context) error {
	if err := d.ConnectSource(ctx); err != nil {
		return err
	}
	if err := d.src.Execute(ctx, "migrate_cancel", nil, nil); err != nil {
		return fmt.Errorf("source: migrate_cancel: %w", err)
	}
	return nil
}

var _ hypervisor.ByteReporter = (*Driver)(nil)

// ReportsBytes implements hypervisor.ByteReporter: query-migrate's
// ram.transferred, every poll.
func (d *Driver) ReportsBytes() bool { return true }

var _ hypervisor.Liveness = (*Driver)(nil)

// SourceGone implements hypervisor.Liveness: Gone on the source's QMP
// socket.
func (d *Driver) SourceGone(context.Context) (bool, string) { return Gone(d.cfg.SourceQMP) }

// DestinationStatus implements hypervisor.Liveness: the destination
// QEMU's query-status (through Incoming: on a deployment, the
// destination's vmhopd, which answers only while the VM is on its way).
func (d *Driver) DestinationStatus(ctx context.Context) (string, error) {
	if d.in == nil {
		return "", errors.New("destination status: no destination")
	}
	raw, err := d.in.Query(ctx, Query{Command: "query-status"})
	if err != nil {
		return "", fmt.Errorf("destination: query-status: %w", err)
	}
	var s queryStatus
	if err := json.Unmarshal(raw, &s); err != nil || s.Status == "" {
		return "", fmt.Errorf("destination: query-status: %q: %v", raw, err)
	}
	return s.Status, nil
}

// Gone says whether the QEMU that served the QMP socket at path exited:
// the socket file is missing (ENOENT) or nothing listens on it
// (ECONNREFUSED: a live QEMU keeps its listening socket, even while
// another client holds the monitor; such a connection waits in the
// backlog), and no process's command line names the socket (a QEMU
// whose socket file was deleted still runs the VM). why says which, for
// the operator. A socket that accepts, a timeout, a full backlog
// (EAGAIN) or a permission error is not gone: the caller retries. One
// connect and a read of /proc/*/cmdline; nothing waits.
func Gone(path string) (gone bool, why string) {
	c, err := net.Dial("unix", path)
	if err == nil {
		c.Close()
		return false, "its QMP socket " + path + " accepts connections"
	}
	if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ECONNREFUSED) {
		return false, fmt.Sprintf("its QMP socket %s: %v", path, err)
	}
	if pid := pidNaming(path); pid > 0 {
		return false, fmt.Sprintf("its QMP socket %s does not answer (%v) but process %d names it", path, err, pid)
	}
	what := "is missing"
	if errors.Is(err, syscall.ECONNREFUSED) {
		what = "refuses connections"
	}
	return true, fmt.Sprintf("its QMP socket %s %s and no process names it", path, what)
}

// pidNaming is a process whose command line has an argument containing
// path (QEMU's -qmp unix:PATH,server=on,...), 0 if none.
func pidNaming(path string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if strings.Contains(a, path) {
				return pid
			}
		}
	}
	return 0
}
