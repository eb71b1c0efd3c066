package labrun

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/guest"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator"
)

// SecondVM is the lab's second guest (vm2, svc2.example.) at site A:
// its own disk, tap, MAC and addresses; size and data as given.
func SecondVM(memMiB int, disk, prefill units.ByteSize) lab.VMConfig {
	return lab.VMConfig{Name: "vm2", IP: lab.OldIP2, IP6: lab.OldIP62, MemMiB: memMiB, DiskSize: disk, Prefill: prefill}
}

// SecondSpec is spec for the lab's second VM (SecondVM): the same
// limits, DNS server and health check; its own name, addresses and DNS
// name (what configs/lab-migration-vm2.yaml says for the lab's spec).
func SecondSpec(spec *config.Migration) *config.Migration {
	s := *spec
	s.Name = spec.Name + "-vm2"
	s.Network.OldIP, s.Network.NewIP = lab.OldIP2, lab.NewIP2
	s.Network.OldIP6, s.Network.NewIP6 = netip.Addr{}, netip.Addr{}
	s.DNS.Name = lab.Svc2Name
	return &s
}

// Move is one VM of a concurrent lab migration (MigrateConcurrent): the
// guest at site A, its spec (SpecFor applies it to the lab), and the
// shape of its client load (nil: the default Load).
type Move struct {
	VM    *lab.VM
	Spec  *config.Migration
	Shape *Load
	// Uncaptured: the capture filter leaves this VM's traffic out, so
	// its echo gaps are timed by its load's own receive times.
	Uncaptured bool
}

// job is one migration handed to site A's vmhopd and followed.
type job struct {
	id         string
	moved      chan daemon.JobReport // the drain event: the VM runs at B
	firstPhase chan time.Time
	ended      chan jobEnd
}

type jobEnd struct {
	res *daemon.Result
	err error
}

// startJob hands specYAML to site A's vmhopd (as `vmhop migrate` does)
// and follows its events.
func startJob(ctx context.Context, l *lab.Lab, specYAML []byte, log *slog.Logger) *job {
	j := &job{moved: make(chan daemon.JobReport, 1), firstPhase: make(chan time.Time, 1), ended: make(chan jobEnd, 1)}
	lc := daemon.NewLocalClient(DaemonSocket(l, lab.SiteA))
	id, err := lc.Migrate(ctx, specYAML)
	if err != nil {
		j.ended <- jobEnd{nil, err}
		return j
	}
	j.id = id
	log.Info("vmhopd at site A runs the migration", "id", id)
	go func() {
		res, err := lc.Follow(ctx, id, func(ev daemon.Event) error {
			log.Info("vmhopd: "+ev.Message, "id", id, "phase", ev.Phase)
			if ev.Phase != "" && !ev.Time.IsZero() {
				select {
				case j.firstPhase <- ev.Time:
				default:
				}
			}
			var jr daemon.JobReport
			if ev.Phase == daemon.PhaseDrain && json.Unmarshal(ev.Data, &jr) == nil {
				select {
				case j.moved <- jr:
				default:
				}
			}
			return nil
		})
		j.ended <- jobEnd{res, err}
	}()
	return j
}

// MigrateConcurrent moves every VM of moves from site A to site B at
// the same time, through the sites' vmhopd (started with the eBPF
// datapath if they do not run): each VM gets its client load (its own
// Load against its own address and DNS name), the client's interface is
// captured once (the echo port: each load's connections are told apart
// by their ports), then the migrations are handed to site A's vmhopd
// together, one job each. Once all have moved (or ended), the loads
// stop, each guest is asked whether it survived (CheckGuest at its new
// address) while the redirects drain, and each job is followed to its
// end. The outcomes are in moves' order; the error joins every
// migration's and guest's. filter is the capture's tcpdump filter (""
// captures the echo port).
func MigrateConcurrent(ctx context.Context, l *lab.Lab, moves []Move, filter string, log *slog.Logger) ([]Outcome, error) {
	outs := make([]Outcome, len(moves))
	if !DaemonsRunning(ctx, l) {
		if err := StartDaemons(ctx, l, Continuity("ebpf")); err != nil {
			return outs, fmt.Errorf("lab %s: start vmhopd on both sites: %w", l.Name, err)
		}
	}
	type prepared struct {
		before guest.Status
		yaml   []byte
		load   *Load
	}
	preps := make([]prepared, len(moves))
	machines := make([]lab.VMConfig, len(moves))
	for i, m := range moves {
		if err := l.WaitGuest(ctx, m.VM.IP, 10*time.Second); err != nil {
			return outs, fmt.Errorf("guest %s at site A does not answer: %w", m.VM.Name, err)
		}
		before, err := l.GuestStatus(ctx, lab.Client, m.VM.IP)
		if err != nil {
			return outs, fmt.Errorf("guest %s status at site A: %w", m.VM.Name, err)
		}
		machines[i] = lab.VMConfig{Name: m.VM.Name, Host: lab.SiteB, IP: m.VM.IP}
		dm, err := l.MachineFor(machines[i])
		if err != nil {
			return outs, err
		}
		y, err := config.MarshalMigration(SpecFor(l, m.VM, dm, m.Spec))
		if err != nil {
			return outs, err
		}
		shape := m.Shape
		if shape == nil {
			shape = &Load{}
		}
		preps[i] = prepared{before: before, yaml: y, load: &Load{L: l, Addr: m.VM.IP, Name: m.Spec.DNS.Name,
			DNS: netip.MustParseAddrPort(m.Spec.DNS.Server), Conns: shape.Conns, EchoEvery: shape.EchoEvery,
			HTTPEvery: shape.HTTPEvery, PingEvery: shape.PingEvery, GiveUp: shape.GiveUp, BulkRate: shape.BulkRate}}
	}
	pcap := l.Path("client.pcap")
	if filter == "" {
		filter = fmt.Sprintf("tcp port %d", EchoPort)
	}
	capture, err := StartCaptureFilter(l, pcap, filter)
	if err != nil {
		return outs, err
	}
	lctx, stop := context.WithCancel(ctx)
	var loads sync.WaitGroup
	for _, p := range preps {
		loads.Go(func() { p.load.Run(lctx) })
	}
	time.Sleep(time.Second)

	// Both jobs at once, as two operators' `vmhop migrate` would.
	jobs := make([]*job, len(moves))
	var started sync.WaitGroup
	for i := range moves {
		outs[i].Start, outs[i].Pcap = time.Now(), pcap
		started.Go(func() { jobs[i] = startJob(ctx, l, preps[i].yaml, log.With("vm", moves[i].VM.Name)) })
	}
	started.Wait()
	reports := make([]daemon.JobReport, len(moves))
	fins := make([]*jobEnd, len(moves))
	for i, j := range jobs {
		select {
		case reports[i] = <-j.moved:
		case f := <-j.ended:
			fins[i] = &f
		}
	}
	time.Sleep(3 * time.Second) // the clients keep talking to the moved VMs
	stop()
	loads.Wait()
	byPort, total, cerr := capture.StopByPort(EchoPort)
	var errs []error
	for i, m := range moves {
		o := &outs[i]
		o.Captured, o.Client = total, preps[i].load.View(byPort)
		if m.Uncaptured {
			o.Client = preps[i].load.View(nil)
		}
		if fins[i] == nil {
			o.Guest = CheckGuest(ctx, l, m.Spec.Network.NewIP, preps[i].before)
			if dm, err := l.MachineFor(machines[i]); err == nil {
				l.MoveVM(m.VM.Machine.Name, dm, lab.SiteB)
			}
		}
	}
	for i, j := range jobs {
		o := &outs[i]
		if fins[i] == nil {
			f := <-j.ended
			fins[i] = &f
		}
		select {
		case t := <-j.firstPhase:
			o.Start = t
		default:
		}
		jr := reports[i]
		err := fins[i].err
		if err == nil {
			err = resultErr(fins[i].res)
			if len(fins[i].res.Report) > 0 {
				json.Unmarshal(fins[i].res.Report, &jr)
			}
		}
		o.Report, o.Preflight, o.Drained = jr.Migration, jr.Preflight, time.Duration(jr.DrainedMS)*time.Millisecond
		if err == nil && cerr != nil {
			err = cerr
		}
		if errors.Is(err, migrator.ErrUnhealthy) {
			o.Guest = CheckGuest(ctx, l, moves[i].Spec.Network.NewIP, preps[i].before)
		}
		if err == nil && !o.Guest.OK() {
			err = fmt.Errorf("the guest did not survive the move: %s", o.Guest.Problem)
		}
		if err != nil {
			o.Err = err.Error()
			errs = append(errs, fmt.Errorf("%s (%s): %w", moves[i].VM.Name, j.id, err))
		}
		o.Exit = migrator.ExitCode(err)
	}
	return outs, errors.Join(errs...)
}
