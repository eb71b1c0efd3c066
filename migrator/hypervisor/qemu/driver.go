package qemu

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
)

// Launcher starts a program on the destination host (vmhopd runs it
// locally; the lab runs it inside the destination's network namespace).
type Launcher interface {
	Launch(ctx context.Context, name, prog string, args []string) (Process, error)
}

// Process is a program a Launcher started.
type Process interface {
	Kill() error
	Exited() <-chan struct{}
}

// PSK is the TLS pre-shared key of one migration (QEMU's tls-creds-psk):
// the stream is encrypted and each QEMU authenticates the other. A fresh
// random key per migration means nothing long-lived to steal.
type PSK struct {
	Username  string // identity the source presents
	Key       []byte // at least 16 random bytes
	SourceDir string // where the source QEMU reads keys.psk
	DestDir   string // where the destination QEMU reads it
}

// Config is one QEMU migration.
type Config struct {
	SourceQMP string  // the running source QEMU's QMP socket
	Dest      Machine // destination definition: the source's, with destination paths
	// DestArgs, if set, are the destination QEMU's arguments as Adopt
	// built them from the running source's command line; Dest then only
	// names the destination (Name, QMPSocket). Unset: Dest.Args().
	DestArgs   []string
	DestListen netip.AddrPort // where the destination listens for the stream (host B's WAN address)
	DestTaps   []Tap          // taps the destination host makes for DestArgs (IncomingStart.Taps)
	Launcher   Launcher       // starts the destination QEMU (for a LocalIncoming)
	// Incoming is the destination host's half (vmhopd on host B);
	// nil: a LocalIncoming with Launcher, in this process.
	Incoming Incoming
	TLS      *PSK // nil sends the stream in plaintext (lab tests only)
	// Dial, if set and Tuning is active, opens the memory stream's TCP
	// connection to DestListen here (the source host), tuned by Tuning
	// (pacing, congestion control: the spec's limits), and hands QEMU the
	// socket (QMP getfd, migrate fd:); else QEMU dials it itself, unpaced
	// (its max-bandwidth is enforced per 100 ms slice, in line-rate
	// bursts). Not with Multifd.
	Dial    func(ctx context.Context, network, addr string) (net.Conn, error)
	Tuning  storage.WANTuning
	Multifd int           // parallel channels; 0 or 1 is one channel
	Poll    time.Duration // progress interval; default 250ms
}

// Driver migrates a QEMU VM; it implements hypervisor.Driver.
type Driver struct {
	cfg      Config
	src      *Monitor
	in       Incoming // the destination's half
	prepared bool
}

var (
	_ hypervisor.Driver          = (*Driver)(nil)
	_ hypervisor.BandwidthSetter = (*Driver)(nil)
)

// New returns a driver for cfg; nothing is started until PrepareDestination.
func New(cfg Config) *Driver {
	if cfg.Poll == 0 {
		cfg.Poll = 250 * time.Millisecond
	}
	in := cfg.Incoming
	if in == nil {
		in = &LocalIncoming{Launcher: cfg.Launcher}
	}
	return &Driver{cfg: cfg, in: in}
}

const tlsID = "vmhop-tls"

func writePSK(dir string, p *PSK) error { return writePSKLine(dir, pskLine(p)) }

// PrepareDestination has the destination host start its QEMU paused
// (-incoming defer) with the same capabilities as the source will use,
// listening for the stream (Incoming.Start); the per-migration PSK goes
// with the request.
func (d *Driver) PrepareDestination(ctx context.Context) error {
	m := d.cfg.Dest
	m.Incoming = "defer"
	args := d.cfg.DestArgs
	if args == nil {
		var err error
		if args, err = m.Args(); err != nil {
			return err
		}
	}
	req := IncomingStart{Name: m.Name, Program: "qemu-system-x86_64", Args: args, QMPSocket: m.QMPSocket,
		Listen: d.cfg.DestListen, Multifd: d.cfg.Multifd, Taps: d.cfg.DestTaps}
	if d.cfg.TLS != nil {
		if len(d.cfg.TLS.Key) < 16 {
			return errors.New("prepare destination: TLS PSK shorter than 16 bytes")
		}
		req.PSK = &PSKSecret{Username: d.cfg.TLS.Username, KeyHex: hex.EncodeToString(d.cfg.TLS.Key), Dir: d.cfg.TLS.DestDir}
	}
	if err := d.in.Start(ctx, req); err != nil {
		return err
	}
	d.prepared = true
	return nil
}

// command is one QMP command with its arguments.
type command struct {
	name string
	args any
}

func caps(m map[string]bool) map[string]any {
	var list []map[string]any
	for k, v := range m {
		list = append(list, map[string]any{"capability": k, "state": v})
	}
	return map[string]any{"capabilities": list}
}

// ConnectSource connects to the source QEMU and, with TLS, gives it the
// migration's client credentials (TLSObject), which the disk mirror's NBD
// connection uses too. Idempotent.
func (d *Driver) ConnectSource(ctx context.Context) error {
	if d.src != nil {
		return nil
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	mon, err := Dial(dctx, d.cfg.SourceQMP)
	cancel()
	if err != nil {
		return fmt.Errorf("source: %w", err)
	}
	if d.cfg.TLS != nil {
		if err := writePSK(d.cfg.TLS.SourceDir, d.cfg.TLS); err != nil {
			mon.Close()
			return err
		}
		// A leftover from an earlier attempt would make object-add fail.
		_ = mon.Execute(ctx, "object-del", map[string]any{"id": tlsID}, nil)
		if err := mon.Execute(ctx, "object-add", map[string]any{"qom-type": "tls-creds-psk", "id": tlsID,
			"dir": d.cfg.TLS.SourceDir, "endpoint": "client", "username": d.cfg.TLS.Username}, nil); err != nil {
			mon.Close()
			return err
		}
	}
	d.src = mon
	return nil
}

// SetBandwidth changes the memory stream's cap while it runs (the
// migrator gives it what the disk stream leaves of the shared budget).
func (d *Driver) SetBandwidth(ctx context.Context, bytesPerSecond uint64) error {
	if d.src == nil {
		return errors.New("set bandwidth: source not connected")
	}
	return d.src.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": bytesPerSecond}, nil)
}

// TLSObject names the TLS credentials object both QEMUs hold once
// ConnectSource and PrepareDestination ran ("" without TLS).
func (d *Driver) TLSObject() string {
	if d.cfg.TLS == nil {
		return ""
	}
	return tlsID
}

// queryMigrate is the part of QEMU's query-migrate reply vmhop reads.
type queryMigrate struct {
	Status           string `json:"status"`
	TotalTime        int64  `json:"total-time"`        // ms
	ExpectedDowntime int64  `json:"expected-downtime"` // ms
	Downtime         int64  `json:"downtime"`          // ms, once completed
	ErrorDesc        string `json:"error-desc"`
	CPUThrottle      int    `json:"cpu-throttle-percentage"`
	RAM              struct {
		Transferred    uint64  `json:"transferred"`
		Remaining      uint64  `json:"remaining"`
		Total          uint64  `json:"total"`
		DirtyPagesRate uint64  `json:"dirty-pages-rate"`
		DirtySyncCount uint64  `json:"dirty-sync-count"`
		Mbps           float64 `json:"mbps"`
		PageSize       uint64  `json:"page-size"`
	} `json:"ram"`
}

func (q queryMigrate) progress(elapsed time.Duration) hypervisor.Progress {
	ps := q.RAM.PageSize
	if ps == 0 {
		ps = 4096
	}
	return hypervisor.Progress{
		Status: q.Status, Elapsed: elapsed,
		Transferred: q.RAM.Transferred, Remaining: q.RAM.Remaining, Total: q.RAM.Total,
		DirtyRate: q.RAM.DirtyPagesRate * ps, Iteration: q.RAM.DirtySyncCount,
		Throughput: q.RAM.Mbps * 1e6, ExpectedDowntime: time.Duration(q.ExpectedDowntime) * time.Millisecond,
		Throttle: q.CPUThrottle,
	}
}

// Migrate implements hypervisor.Driver.
func (d *Driver) Migrate(ctx context.Context, opts hypervisor.Options, progress chan<- hypervisor.Progress, switchover hypervisor.Switchover) (hypervisor.Result, error) {
	var res hypervisor.Result
	if !d.prepared {
		return res, errors.New("migrate: destination not prepared")
	}
	if err := d.ConnectSource(ctx); err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	downtime := opts.Downtime
	params := map[string]any{
		"max-bandwidth":  opts.Bandwidth.BytesPerSecond(),
		"downtime-limit": downtime.Milliseconds(),
	}
	if d.cfg.Multifd > 1 {
		params["multifd-channels"] = d.cfg.Multifd
	}
	if d.cfg.TLS != nil {
		params["tls-creds"] = tlsID
		params["tls-hostname"] = d.cfg.DestListen.Addr().String()
	} else {
		params["tls-creds"] = ""
	}
	if err := d.src.Execute(ctx, "migrate-set-capabilities", caps(map[string]bool{
		"events": true, "pause-before-switchover": true, "auto-converge": opts.AutoConverge, "multifd": d.cfg.Multifd > 1,
	}), nil); err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	if err := d.src.Execute(ctx, "migrate-set-parameters", params, nil); err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	// The MIGRATION event says "pre-switchover" the moment the source
	// stops: polling would add up to a poll interval to the pause, and
	// packets reaching the stopped source meanwhile are lost with it.
	events, unsubscribe := d.src.Events()
	defer unsubscribe()
	start := time.Now()
	uri := "tcp:" + d.cfg.DestListen.String()
	// vmhopd holds the memory stream's socket only here: with multifd, no
	// Dial or an inactive Tuning, QEMU dials its own sockets, unpaced by
	// the kernel (QEMU's max-bandwidth alone holds the budget, and QEMU
	// lifts it for the stop-and-copy), and there is no pacing to lift.
	var pacer *storage.Pacer
	if d.cfg.Dial != nil && d.cfg.Tuning.Active() && d.cfg.Multifd <= 1 {
		conn, p, err := d.streamSocket(ctx, opts.Bandwidth)
		if err != nil {
			return res, fmt.Errorf("migrate: %w", err)
		}
		pacer = p
		defer conn.Close() // QEMU holds its own copy; this one keeps the pacer's view of the socket
		uri = "fd:" + streamFD
	}
	if err := d.src.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	tick := time.NewTicker(d.cfg.Poll)
	defer tick.Stop()
	budget := uint64(opts.MaxIterations)
	hooked := false
	var stoppedAt time.Time // QEMU's time of the stop, from its event
	for {
		select {
		case <-ctx.Done():
			return res, d.abort(fmt.Errorf("%w: %v", hypervisor.ErrCancelled, context.Cause(ctx)))
		case <-d.in.Exited():
			return res, d.abort(fmt.Errorf("%w: destination QEMU exited during the migration", hypervisor.ErrDestinationFailed))
		case <-d.src.Done():
			return res, fmt.Errorf("migrate: source QMP connection lost (did the source QEMU exit?)")
		case ev := <-events:
			if ev.Name != "MIGRATION" {
				continue
			}
			// The stop itself: hook at once, without a query round trip
			// (every packet reaching the stopped source is lost with it).
			var st struct{ Status string }
			if json.Unmarshal(ev.Data, &st) == nil && st.Status == "pre-switchover" {
				stoppedAt = ev.Time
				if !hooked {
					hooked = true
					if err := d.switchover(ctx, &res, switchover, pacer); err != nil {
						return res, err
					}
				}
				continue
			}
		case <-tick.C:
		}
		var q queryMigrate
		if err := d.src.Execute(ctx, "query-migrate", nil, &q); err != nil {
			if ctx.Err() != nil {
				continue // handled as a cancel above
			}
			return res, d.abort(fmt.Errorf("migrate: %w", err))
		}
		elapsed := time.Since(start)
		p := q.progress(elapsed)
		if progress != nil {
			select {
			case progress <- p:
			default:
			}
		}
		switch q.Status {
		case "pre-switchover":
			if hooked {
				continue
			}
			hooked = true
			if err := d.switchover(ctx, &res, switchover, pacer); err != nil {
				return res, err
			}
		case "completed":
			res.Total = elapsed
			if !stoppedAt.IsZero() && !res.HookAt.IsZero() {
				res.HookLag = res.HookAt.Sub(stoppedAt)
			}
			if q.Downtime == 0 { // the event can beat the final statistics
				time.Sleep(20 * time.Millisecond)
				_ = d.src.Execute(ctx, "query-migrate", nil, &q)
			}
			res.Downtime = time.Duration(q.Downtime) * time.Millisecond
			res.Transferred = q.RAM.Transferred
			res.Iterations = q.RAM.DirtySyncCount
			if err := d.waitDestinationRunning(ctx); err != nil {
				// The source stopped in "postmigrate" holds everything:
				// run it again (cont takes its disk back).
				return res, d.abort(err)
			}
			return res, nil
		case "failed", "cancelled":
			return res, d.abort(fmt.Errorf("%w: migration %s: %s", hypervisor.ErrDestinationFailed, q.Status, q.ErrorDesc))
		case "active":
			if opts.Deadline > 0 && elapsed > opts.Deadline {
				return res, d.abort(fmt.Errorf("%w: deadline %s passed with %d MiB left (pass %d)",
					hypervisor.ErrNotConverging, opts.Deadline, p.Remaining>>20, p.Iteration))
			}
			if budget > 0 && p.Iteration > budget {
				if opts.MaxDowntime > downtime {
					downtime = min(2*downtime, opts.MaxDowntime)
					budget += uint64(opts.MaxIterations)
					if err := d.src.Execute(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": downtime.Milliseconds()}, nil); err != nil {
						return res, d.abort(fmt.Errorf("migrate: escalate: %w", err))
					}
					continue
				}
				return res, d.abort(fmt.Errorf("%w: after %d passes %d MiB remain: the guest dirties %.1f MiB/s, the stream carries %.1f MiB/s",
					hypervisor.ErrNotConverging, p.Iteration, p.Remaining>>20, float64(p.DirtyRate)/(1<<20), p.Throughput/8/(1<<20)))
			}
		}
	}
}

// switchover runs the hook in the source's pause, then lets QEMU finish.
// The memory stream's socket goes unpaced first (pacer: nil when vmhopd
// does not hold it): QEMU lifts its own rate limit for the stop-and-copy,
// and a socket still paced at the budget would stretch the pause.
func (d *Driver) switchover(ctx context.Context, res *hypervisor.Result, hook hypervisor.Switchover, pacer *storage.Pacer) error {
	t0 := time.Now()
	res.HookAt = t0
	if err := pacer.Lift(); err != nil {
		slog.Warn("memory stream: pacing not lifted for the pause", "err", err)
	}
	if err := hook(ctx); err != nil {
		return d.abort(fmt.Errorf("%w: %v", hypervisor.ErrSwitchover, err))
	}
	res.Hook = time.Since(t0)
	if err := d.src.Execute(context.Background(), "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
		return d.abort(fmt.Errorf("migrate: %w", err))
	}
	return nil
}

// abort cancels the migration on the source, waits until QEMU has left the
// migration, makes sure the source runs, and returns cause.
func (d *Driver) abort(cause error) error {
	bg, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = d.src.Execute(bg, "migrate_cancel", nil, nil)
	for bg.Err() == nil {
		var q queryMigrate
		if err := d.src.Execute(bg, "query-migrate", nil, &q); err != nil {
			break
		}
		if q.Status != "cancelling" && q.Status != "active" && q.Status != "pre-switchover" && q.Status != "device" && q.Status != "setup" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := d.ensureRunning(bg, d.src); err != nil {
		return fmt.Errorf("%w; and the source is not running: %v", cause, err)
	}
	return cause
}

type queryStatus struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

func (d *Driver) ensureRunning(ctx context.Context, m *Monitor) error {
	var s queryStatus
	if err := m.Execute(ctx, "query-status", nil, &s); err != nil {
		return err
	}
	if s.Running {
		return nil
	}
	if err := m.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("source in state %q: %w", s.Status, err)
	}
	return nil
}

// waitDestinationRunning waits for the destination guest to run after the
// stream completed.
func (d *Driver) waitDestinationRunning(ctx context.Context) error {
	if err := d.in.WaitRunning(ctx, RunningWait{Timeout: 30 * time.Second}); err != nil {
		return fmt.Errorf("%w: %v", hypervisor.ErrDestinationFailed, err)
	}
	return nil
}

// ResumeSource implements hypervisor.Driver: QEMU lets a source in
// "postmigrate" run again (it takes its disk back).
func (d *Driver) ResumeSource(ctx context.Context) error {
	return d.ensureRunning(ctx, d.src)
}

// AbortDestination implements hypervisor.Driver.
func (d *Driver) AbortDestination(ctx context.Context) error {
	d.prepared = false
	return d.in.Stop(ctx)
}

// StopSource implements hypervisor.Driver: quit the source QEMU.
func (d *Driver) StopSource(ctx context.Context) error {
	if d.src == nil {
		return errors.New("stop source: not connected")
	}
	return d.src.Execute(ctx, "quit", nil, nil)
}

// Close releases the QMP connections; the QEMUs keep running.
func (d *Driver) Close() error {
	if d.src != nil {
		d.src.Close()
	}
	if l, ok := d.in.(*LocalIncoming); ok {
		l.Close()
	}
	return nil
}

// DestMachine is the destination's definition as started.
func (d *Driver) DestMachine() Machine { return d.cfg.Dest }

// Source returns the source monitor once Migrate has connected (for status checks).
func (d *Driver) Source() *Monitor { return d.src }

// Destination returns the destination monitor once prepared, when the
// destination's half runs in this process (LocalIncoming); else nil.
func (d *Driver) Destination() *Monitor {
	if l, ok := d.in.(*LocalIncoming); ok {
		return l.Monitor()
	}
	return nil
}

// Incoming is the destination's half the driver uses.
func (d *Driver) Incoming() Incoming { return d.in }

// streamFD is the name the memory stream's socket has in the source QEMU.
const streamFD = "vmhop-migration"

// streamSocket dials the memory stream with cfg.Dial, tunes it for a
// budget of bw, and passes QEMU a copy under streamFD. The Pacer (nil if
// unpaced) lifts the socket's pacing; QEMU's copy is the same socket.
func (d *Driver) streamSocket(ctx context.Context, bw units.Bitrate) (net.Conn, *storage.Pacer, error) {
	conn, err := d.cfg.Dial(ctx, "tcp", d.cfg.DestListen.String())
	if err != nil {
		return nil, nil, fmt.Errorf("memory stream: dial %s: %w", d.cfg.DestListen, err)
	}
	pacer, err := d.cfg.Tuning.Apply(conn, float64(bw.BytesPerSecond()))
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("memory stream: %w", err)
	}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		conn.Close()
		return nil, nil, fmt.Errorf("memory stream: %T is not a TCP connection", conn)
	}
	f, err := tc.File()
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("memory stream: %w", err)
	}
	defer f.Close()
	if err := d.src.ExecuteWithFile(ctx, "getfd", map[string]any{"fdname": streamFD}, f, nil); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("memory stream: %w", err)
	}
	return conn, pacer, nil
}
