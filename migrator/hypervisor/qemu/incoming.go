package qemu

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Incoming is the destination host's half of a QEMU migration: what
// vmhopd on host B does for the driver on host A (on a deployment, over
// the peer channel; in one process, LocalIncoming). Arguments and
// results encode to JSON. The destination's QMP socket never leaves its
// host.
type Incoming interface {
	// Start starts the destination QEMU paused for the stream
	// (IncomingStart.Args end with -incoming defer), waits for its QMP
	// socket, sets the capabilities and TLS credentials the source will
	// use, and listens for the stream (migrate-incoming).
	Start(ctx context.Context, req IncomingStart) error
	// Query runs one of QEMU's read-only query-* commands on the
	// destination and returns its result as QEMU gives it.
	Query(ctx context.Context, req Query) (json.RawMessage, error)
	// ExportDisk serves the destination's disk node over NBD
	// (nbd-server-start, block-export-add, writable) for the mirror.
	ExportDisk(ctx context.Context, req DiskExport) error
	// UnexportDisk ends the export and the NBD server; nothing to do if
	// there is none or QEMU is gone.
	UnexportDisk(ctx context.Context) error
	// WaitRunning waits until the guest runs after the stream completed.
	WaitRunning(ctx context.Context, req RunningWait) error
	// Stop quits the destination QEMU (killed if it does not quit) and
	// deletes the migration's secrets on the host. Idempotent.
	Stop(ctx context.Context) error
	// Exited is closed when the destination QEMU exits (nil before Start).
	Exited() <-chan struct{}
}

// IncomingStart starts the destination QEMU.
type IncomingStart struct {
	Name      string         `json:"name"`       // for logs and the process
	Program   string         `json:"program"`    // e.g. "qemu-system-x86_64"
	Args      []string       `json:"args"`       // with -incoming defer
	QMPSocket string         `json:"qmp_socket"` // the one Args names
	Listen    netip.AddrPort `json:"listen"`     // where the stream arrives (the WAN address)
	Multifd   int            `json:"multifd,omitempty"`
	// Taps are the tap devices Args name, for the destination host to
	// create (up, in their bridge) before QEMU starts and remove if the
	// migration fails. LocalIncoming leaves them to its caller.
	Taps []Tap `json:"taps,omitempty"`
	// PSK, if set, is the stream's per-migration key (tls-creds-psk,
	// endpoint server): the source made it and hands it over; the host
	// stores it 0600 in PSK.Dir and deletes it at Stop.
	PSK *PSKSecret `json:"psk,omitempty"`
}

// Tap is a tap device of the destination VM (migration.destination.tap).
type Tap struct {
	Name   string `json:"name"`
	Bridge string `json:"bridge,omitempty"` // "" leaves it out of any bridge
}

// PSKSecret is a per-migration TLS pre-shared key as it crosses to the
// destination: QEMU's keys.psk line, "username:hexkey".
type PSKSecret struct {
	Username string `json:"username"`
	KeyHex   string `json:"key_hex"`
	Dir      string `json:"dir"` // on the destination host
}

// Query names a query-* command.
type Query struct {
	Command string `json:"command"`
}

// DiskExport is the NBD export of the destination's disk.
type DiskExport struct {
	Listen netip.AddrPort `json:"listen"` // the NBD server (the destination's loopback behind a relay)
	Node   string         `json:"node"`   // the disk's node name; also the export's name
	TLS    bool           `json:"tls"`    // NBD with the migration's TLS credentials
}

// RunningWait bounds WaitRunning.
type RunningWait struct {
	Timeout time.Duration `json:"timeout_ns"`
}

// LocalIncoming is Incoming on this host: it launches QEMU through its
// Launcher (the lab: in the destination's namespace).
type LocalIncoming struct {
	Launcher Launcher
	// CloseClients, if set, closes this host's connections to the NBD
	// server (a relay's destination end) between the export's deletion
	// and the server's stop: a connection QEMU has not attached to the
	// export (one negotiating, or held for a reconnect) must close while
	// the server exists, or QEMU 7.2 aborts when it does
	// (blockdev-nbd.c:62, nbd_blockdev_client_closed: nbd_server).
	CloseClients func()

	mu       sync.Mutex
	mon      *Monitor
	proc     Process
	pskDir   string
	exported bool
}

var _ Incoming = (*LocalIncoming)(nil)

// Start implements Incoming.
func (l *LocalIncoming) Start(ctx context.Context, req IncomingStart) error {
	if l.mon != nil {
		return errors.New("prepare destination: already started")
	}
	os.Remove(req.QMPSocket)
	if req.PSK != nil {
		if len(req.PSK.KeyHex) < 32 {
			return errors.New("prepare destination: TLS PSK shorter than 16 bytes")
		}
		if err := writePSKLine(req.PSK.Dir, req.PSK.Username+":"+req.PSK.KeyHex); err != nil {
			return fmt.Errorf("prepare destination: %w", err)
		}
		l.pskDir = req.PSK.Dir
	}
	proc, err := l.Launcher.Launch(ctx, req.Name, req.Program, req.Args)
	if err != nil {
		l.removePSK()
		return fmt.Errorf("prepare destination: start qemu: %w", err)
	}
	l.proc = proc
	dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	go func() {
		select {
		case <-proc.Exited():
			cancel() // QEMU died (bad args, port in use): stop waiting for its socket
		case <-dctx.Done():
		}
	}()
	mon, err := Dial(dctx, req.QMPSocket)
	if err != nil {
		proc.Kill()
		l.removePSK()
		return fmt.Errorf("prepare destination: %w", err)
	}
	l.mon = mon
	steps := []command{{"migrate-set-capabilities", caps(map[string]bool{"events": true, "multifd": req.Multifd > 1})}}
	if req.PSK != nil {
		steps = append(steps,
			command{"object-add", map[string]any{"qom-type": "tls-creds-psk", "id": tlsID, "dir": req.PSK.Dir, "endpoint": "server"}},
			command{"migrate-set-parameters", map[string]any{"tls-creds": tlsID}})
	}
	if req.Multifd > 1 {
		steps = append(steps, command{"migrate-set-parameters", map[string]any{"multifd-channels": req.Multifd}})
	}
	steps = append(steps, command{"migrate-incoming", map[string]any{"uri": "tcp:" + req.Listen.String()}})
	for _, s := range steps {
		if err := mon.Execute(ctx, s.name, s.args, nil); err != nil {
			l.Stop(context.Background())
			return fmt.Errorf("prepare destination: %w", err)
		}
	}
	return nil
}

func writePSKLine(dir, line string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "keys.psk"), []byte(line+"\n"), 0o600)
}

func (l *LocalIncoming) removePSK() {
	if l.pskDir != "" {
		os.Remove(filepath.Join(l.pskDir, "keys.psk"))
		l.pskDir = ""
	}
}

// Query implements Incoming.
func (l *LocalIncoming) Query(ctx context.Context, req Query) (json.RawMessage, error) {
	if !strings.HasPrefix(req.Command, "query-") {
		return nil, fmt.Errorf("destination query %q: only query-* commands", req.Command)
	}
	if l.mon == nil {
		return nil, fmt.Errorf("destination query %s: not started", req.Command)
	}
	var out json.RawMessage
	err := l.mon.Execute(ctx, req.Command, nil, &out)
	return out, err
}

// ExportDisk implements Incoming.
func (l *LocalIncoming) ExportDisk(ctx context.Context, req DiskExport) error {
	if l.mon == nil {
		return errors.New("export disk: destination not started")
	}
	nbd := map[string]any{"addr": map[string]any{"type": "inet", "data": map[string]any{
		"host": req.Listen.Addr().String(), "port": strconv.Itoa(int(req.Listen.Port()))}}}
	if req.TLS {
		nbd["tls-creds"] = tlsID
	}
	if err := l.mon.Execute(ctx, "nbd-server-start", nbd, nil); err != nil {
		return fmt.Errorf("export disk: %w", err)
	}
	l.mu.Lock()
	l.exported = true
	l.mu.Unlock()
	if err := l.mon.Execute(ctx, "block-export-add", map[string]any{"type": "nbd", "id": exportID,
		"node-name": req.Node, "name": req.Node, "writable": true}, nil); err != nil {
		return fmt.Errorf("export disk: %w", err)
	}
	return nil
}

// UnexportDisk implements Incoming. "hard" closes the NBD connection the
// server may still be tearing down instead of failing "in use"; a QEMU
// that is gone has nothing left to take down.
func (l *LocalIncoming) UnexportDisk(ctx context.Context) error {
	l.mu.Lock()
	exported := l.exported
	l.exported = false
	l.mu.Unlock()
	if !exported || l.mon == nil {
		return nil
	}
	var first error
	if err := l.mon.Execute(ctx, "block-export-del", map[string]any{"id": exportID, "mode": "hard"}, nil); err != nil && !errors.Is(err, ErrClosed) {
		first = err
	}
	// The export goes once its clients are closed, which QEMU does after
	// block-export-del returns; stopping the server before that makes the
	// closing client find no server: QEMU 7.2 aborts (blockdev-nbd.c:62,
	// nbd_blockdev_client_closed: assertion `nbd_server'), seen between
	// two daemons. So wait until query-block-exports no longer lists it.
	for deadline := time.Now().Add(5 * time.Second); first == nil && time.Now().Before(deadline); {
		var exports []blockExport
		if err := l.mon.Execute(ctx, "query-block-exports", nil, &exports); err != nil {
			break
		}
		if !slices.ContainsFunc(exports, func(e blockExport) bool { return e.ID == exportID }) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if l.CloseClients != nil {
		l.CloseClients()
		time.Sleep(200 * time.Millisecond) // QEMU handles the hang-ups on its main loop
	}
	if err := l.mon.Execute(ctx, "nbd-server-stop", nil, nil); err != nil && first == nil && !errors.Is(err, ErrClosed) {
		first = err
	}
	return first
}

// blockExport is an entry of query-block-exports.
type blockExport struct {
	ID string `json:"id"`
}

// WaitRunning implements Incoming.
func (l *LocalIncoming) WaitRunning(ctx context.Context, req RunningWait) error {
	if l.mon == nil {
		return errors.New("wait running: destination not started")
	}
	ctx, cancel := context.WithTimeout(ctx, req.Timeout)
	defer cancel()
	for {
		var s queryStatus
		err := l.mon.Execute(ctx, "query-status", nil, &s)
		if err == nil && s.Running {
			return nil
		}
		if isDone(l.mon.Done()) {
			return errors.New("destination QEMU exited after the stream completed")
		}
		if ctx.Err() != nil {
			return fmt.Errorf("destination not running (state %q): %v", s.Status, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop implements Incoming.
func (l *LocalIncoming) Stop(ctx context.Context) error {
	defer l.removePSK()
	if l.mon != nil {
		_ = l.mon.Execute(ctx, "quit", nil, nil)
		l.mon.Close()
		l.mon = nil
	}
	if l.proc == nil {
		return nil
	}
	select {
	case <-l.proc.Exited():
	case <-time.After(3 * time.Second):
		l.proc.Kill()
		<-l.proc.Exited()
	}
	return nil
}

// Exited implements Incoming.
func (l *LocalIncoming) Exited() <-chan struct{} {
	if l.proc == nil {
		return nil
	}
	return l.proc.Exited()
}

// Close releases the QMP connection; QEMU keeps running.
func (l *LocalIncoming) Close() {
	if l.mon != nil {
		l.mon.Close()
	}
}

// Monitor is the destination QEMU's QMP connection (tests stop and
// continue the destination guest with it); nil before Start.
func (l *LocalIncoming) Monitor() *Monitor { return l.mon }

// pskLine is QEMU's keys.psk line for p.
func pskLine(p *PSK) string { return p.Username + ":" + hex.EncodeToString(p.Key) }
