package qemu

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

// Mirror copies a running QEMU VM's disk to the destination QEMU with QEMU's
// own dirty tracking: the destination exports its (empty) disk over NBD,
// the source mirrors into it. The bulk copy runs while the guest runs;
// once it is done ("ready"), every guest write is copied before it
// completes (copy-mode write-blocking), so at the pause nothing is left but
// the writes in flight, and Complete is proportional to them, not to the
// disk size. NBD uses the migration's TLS credentials.
type Mirror struct {
	Src *Monitor // the source QEMU
	Dst Incoming // the destination host's half (exports the disk)
	// Node is the disk's node name in both QEMUs (qemu.Machine uses "disk0").
	Node string
	// Listen is where the destination serves NBD: host B's WAN address, or
	// a local one when a Relay carries the connection.
	Listen netip.AddrPort
	// SourceSocket, if set, is the unix socket the source connects to
	// instead of Listen (a Relay's source end).
	SourceSocket string
	// TLS names the credentials object both QEMUs hold; "" is plaintext.
	TLS string
	// Speed caps the bulk copy; 0 is unlimited.
	Speed units.Bitrate
	// ReconnectDelay, if set, lets the source's NBD client reconnect after
	// its connection broke, holding requests that long (with a Relay,
	// which gives up on a stalled WAN connection).
	ReconnectDelay time.Duration
	// BeforeConnect, if set, runs once the destination exports the disk
	// (named export) and before the source connects to it (a Relay's
	// Negotiate).
	BeforeConnect func(ctx context.Context, export string) error

	started, exported, targetAdded bool
	copied                         uint64 // bulk progress at the last poll (QEMU counts holes)
}

const (
	mirrorJob  = "vmhop-mirror"
	mirrorNode = "vmhop-mirror-target"
	exportID   = "vmhop-export"
)

// MirrorProgress is the mirror's state.
type MirrorProgress struct {
	Done, Total uint64        // bytes (QEMU counts holes as copied)
	Ready       bool          // bulk copy done; writes are mirrored synchronously
	Rate        float64       // bits per second since the start
	ETA         time.Duration // at Rate, until Done reaches Total
}

// Start exports the destination disk and starts mirroring into it. What
// an earlier migration's recovery left on the source (CancelLeftover: a
// job, the target node) is removed first.
func (m *Mirror) Start(ctx context.Context) error {
	if err := m.CancelLeftover(ctx); err != nil {
		return err
	}
	_ = m.Src.Execute(ctx, "blockdev-del", map[string]any{"node-name": mirrorNode}, nil) // none: an error, nothing to do
	m.exported = true
	if err := m.Dst.ExportDisk(ctx, DiskExport{Listen: m.Listen, Node: m.Node, TLS: m.TLS != ""}); err != nil {
		return fmt.Errorf("mirror: %w", err)
	}
	if m.BeforeConnect != nil {
		if err := m.BeforeConnect(ctx, m.Node); err != nil {
			return fmt.Errorf("mirror: %w", err)
		}
	}
	server := map[string]any{"type": "inet", "host": m.Listen.Addr().String(), "port": strconv.Itoa(int(m.Listen.Port()))}
	if m.SourceSocket != "" {
		server = map[string]any{"type": "unix", "path": m.SourceSocket}
	}
	target := map[string]any{"driver": "nbd", "node-name": mirrorNode, "export": m.Node, "server": server}
	if m.TLS != "" {
		target["tls-creds"] = m.TLS
	}
	if m.ReconnectDelay > 0 {
		target["reconnect-delay"] = int(m.ReconnectDelay.Seconds())
	}
	if err := m.Src.Execute(ctx, "blockdev-add", target, nil); err != nil {
		return fmt.Errorf("mirror: %w", err)
	}
	m.targetAdded = true
	args := map[string]any{"job-id": mirrorJob, "device": m.Node, "target": mirrorNode, "sync": "full",
		"copy-mode": "write-blocking", "auto-dismiss": false}
	if m.Speed > 0 {
		args["speed"] = m.Speed.BytesPerSecond()
	}
	if err := m.Src.Execute(ctx, "blockdev-mirror", args, nil); err != nil {
		return fmt.Errorf("mirror: %w", err)
	}
	m.started = true
	return nil
}

type blockJob struct {
	Device string `json:"device"`
	Len    uint64 `json:"len"`
	Offset uint64 `json:"offset"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
	Speed  uint64 `json:"speed"`
	Busy   bool   `json:"busy"`
	Error  string `json:"error"`
}

func (m *Mirror) job(ctx context.Context) (*blockJob, error) {
	var jobs []blockJob
	if err := m.Src.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil {
		return nil, err
	}
	for i := range jobs {
		if jobs[i].Device == mirrorJob {
			return &jobs[i], nil
		}
	}
	return nil, nil
}

// WaitReady waits for the bulk copy to finish, reporting progress.
func (m *Mirror) WaitReady(ctx context.Context, progress func(MirrorProgress)) error {
	start := time.Now()
	for {
		j, err := m.job(ctx)
		if err != nil {
			return fmt.Errorf("mirror: %w", err)
		}
		if j == nil {
			return fmt.Errorf("mirror: job vanished")
		}
		if j.Error != "" || j.Status == "concluded" || j.Status == "aborting" {
			return fmt.Errorf("mirror: job %s: %s", j.Status, j.Error)
		}
		m.copied = j.Offset
		if progress != nil {
			p := MirrorProgress{Done: j.Offset, Total: j.Len, Ready: j.Ready,
				Rate: float64(j.Offset) * 8 / time.Since(start).Seconds()}
			if p.Rate > 0 && j.Len > j.Offset {
				p.ETA = time.Duration(float64(j.Len-j.Offset) * 8 / p.Rate * float64(time.Second))
			}
			progress(p)
		}
		if j.Ready {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WaitSynced waits until the mirror has no copy in progress and nothing
// left to copy (up to 2 s): with the source paused and drained, the
// destination then holds the same bytes.
func (m *Mirror) WaitSynced(ctx context.Context) error {
	deadline := time.Now().Add(2 * time.Second)
	for {
		j, err := m.job(ctx)
		if err != nil {
			return fmt.Errorf("mirror: %w", err)
		}
		if j == nil || !j.Ready {
			return fmt.Errorf("mirror: not ready at the pause")
		}
		if j.Offset == j.Len && !j.Busy {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("mirror: %d bytes still to copy at the pause", j.Len-j.Offset)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Complete ends the mirror once the VM runs at the destination: cancelling
// a ready mirror leaves the destination an exact copy; then the NBD
// connection and export are taken down (source side first, as QEMU wants).
func (m *Mirror) Complete(ctx context.Context) error {
	if err := m.Src.Execute(ctx, "block-job-cancel", map[string]any{"device": mirrorJob}, nil); err != nil {
		return fmt.Errorf("mirror: complete: %w", err)
	}
	for {
		j, err := m.job(ctx)
		if err != nil {
			return fmt.Errorf("mirror: complete: %w", err)
		}
		if j == nil || j.Status == "concluded" {
			if j != nil && j.Error != "" {
				return fmt.Errorf("mirror: complete: %s", j.Error)
			}
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
	_ = m.Src.Execute(ctx, "job-dismiss", map[string]any{"id": mirrorJob}, nil)
	m.started = false
	return m.teardown(ctx)
}

// Abort stops the mirror (the source disk is untouched) and removes the export.
func (m *Mirror) Abort(ctx context.Context) error {
	if m.started {
		m.cancelJob(ctx, 5*time.Second)
		_ = m.Src.Execute(ctx, "job-dismiss", map[string]any{"id": mirrorJob}, nil)
		m.started = false
	}
	return m.teardown(ctx)
}

// cancelJob cancels the mirror job (force: nothing more is copied) and
// waits up to max for it to conclude or go. The cancel is repeated every
// 100 ms: QEMU's force cancel makes the NBD target drop requests waiting
// for a reconnect (nbd_cancel_in_flight), but a request that finds the
// connection broken only after that waits out the whole reconnect delay
// (mirrorReconnectDelay, 60 s) — seen when the relay's process died with
// the guest paused, so no request had noticed yet.
func (m *Mirror) cancelJob(ctx context.Context, max time.Duration) {
	for deadline := time.Now().Add(max); ; {
		j, err := m.job(ctx)
		if err != nil || j == nil || j.Status == "concluded" || time.Now().After(deadline) {
			return
		}
		_ = m.Src.Execute(ctx, "block-job-cancel", map[string]any{"device": mirrorJob, "force": true}, nil)
		time.Sleep(100 * time.Millisecond)
	}
}

// CancelLeftover ends the job a mirror started by a process that died
// left on the source (this Mirror is a new one and knows nothing of it):
// cancelled, then dismissed. Idempotent: no job is not an error; only a
// source that cannot be asked, or a job that does not go, is. The job's
// NBD target node stays: closing it waits out the NBD client's reconnect
// delay (mirrorReconnectDelay) with QEMU's monitor blocked (seen: 60 s in
// blockdev-del when the relay's process died); Start removes a leftover
// one, by then long idle.
func (m *Mirror) CancelLeftover(ctx context.Context) error {
	j, err := m.job(ctx)
	if err != nil {
		return fmt.Errorf("mirror: %w", err)
	}
	if j == nil {
		return nil
	}
	m.cancelJob(ctx, 15*time.Second)
	if err := m.Src.Execute(ctx, "job-dismiss", map[string]any{"id": mirrorJob}, nil); err != nil {
		if j, _ := m.job(ctx); j != nil {
			return fmt.Errorf("mirror: the leftover job %s (%s) stays: %w", mirrorJob, j.Status, err)
		}
	}
	return nil
}

func (m *Mirror) teardown(ctx context.Context) error {
	var first error
	if m.targetAdded {
		// A source QEMU that exited took the node with it: nothing to
		// remove (the VM is lost, which the migration's error says).
		if err := m.Src.Execute(ctx, "blockdev-del", map[string]any{"node-name": mirrorNode}, nil); err != nil && first == nil && !errors.Is(err, ErrExited) {
			first = err
		}
		m.targetAdded = false
	}
	if m.exported {
		// The source has let go (the destination's export goes second,
		// as QEMU wants).
		if err := m.Dst.UnexportDisk(ctx); err != nil && first == nil {
			first = err
		}
		m.exported = false
	}
	return first
}
