package labrun

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/migrator"
)

// Outcome is a lab migration with what the client saw.
type Outcome struct {
	Report     migrator.Report
	Sent, Got  int
	Reconnects int
	Probe      Disruption // as the probe's socket saw it
	Packets    Disruption // as captured on the client's interface
	Captured   int
	Drained    time.Duration
	Start      time.Time // when the migration started
}

// phaseAt names the phase running at t. Phases run one after the other,
// except dns-prepare, which starts after datapath beside the disk phases;
// memory waits for both.
func (o Outcome) phaseAt(t time.Time) string {
	at, dnsEnd := o.Start, o.Start
	for _, ph := range o.Report.Phases {
		if ph.Name == "datapath" {
			dnsEnd = at.Add(ph.Duration)
		}
	}
	for _, ph := range o.Report.Phases {
		if ph.Name == "dns-prepare" {
			dnsEnd = dnsEnd.Add(ph.Duration)
		}
	}
	for _, ph := range o.Report.Phases {
		switch ph.Name {
		case "dns-prepare":
			continue
		case "memory":
			if t.Before(dnsEnd) && !t.Before(at) {
				return "dns-prepare"
			}
			at = later(at, dnsEnd)
		}
		if t.Before(at.Add(ph.Duration)) {
			return ph.Name
		}
		at = at.Add(ph.Duration)
	}
	return "after the migration"
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// Migrate moves the lab's guest from site A to B under spec while a client
// probes it (one TCP connection, a request every 10 ms) and tcpdump
// captures the client's interface; then drains the redirect.
func Migrate(ctx context.Context, l *lab.Lab, spec *config.Migration, log *slog.Logger) (Outcome, error) {
	var out Outcome
	var vm *lab.VM
	for _, v := range l.State.VMs {
		if v.Host == lab.SiteA {
			vm = v
		}
	}
	if vm == nil {
		return out, fmt.Errorf("lab %s has no VM at site A (start one: vmhop lab vm start --name %s)", l.Name, l.Name)
	}
	if err := l.WaitGuest(ctx, vm.IP, 10*time.Second); err != nil {
		return out, fmt.Errorf("guest at site A does not answer: %w", err)
	}
	p, err := Plan(ctx, l, vm, spec, log)
	if err != nil {
		return out, err
	}
	const port = 7
	capture, err := StartCapture(l, l.Path("client.pcap"), port)
	if err != nil {
		return out, err
	}
	probe := &Probe{L: l, Target: netip.AddrPortFrom(vm.IP, port), Interval: 10 * time.Millisecond}
	pctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { probe.Run(pctx); close(done) }()
	time.Sleep(time.Second)

	out.Start = time.Now()
	out.Report, err = migrator.Run(ctx, p)
	time.Sleep(2 * time.Second) // the client keeps talking to the moved VM
	stop()
	<-done
	out.Sent, out.Got, out.Reconnects, out.Probe = probe.Result()
	arrivals, total, cerr := capture.Stop(port)
	out.Captured = total
	out.Packets = Gaps(arrivals, probe.Interval)
	if err != nil {
		return out, err
	}
	if cerr != nil {
		return out, cerr
	}
	l.MoveVM(vm.Machine.Name, p.Driver.DestMachine(), lab.SiteB)
	out.Drained, err = migrator.Drain(ctx, p)
	return out, err
}

// Print writes the outcome for people.
func (o Outcome) Print(w io.Writer) {
	r := o.Report
	fmt.Fprintf(w, "migration: %s total\n", r.Total.Round(time.Millisecond))
	for _, ph := range r.Phases {
		fmt.Fprintf(w, "  %-15s %10s %s\n", ph.Name, ph.Duration.Round(time.Millisecond), ph.Err)
	}
	fmt.Fprintf(w, "memory: %d MiB in %d passes over %s; QEMU-reported pause %s (switchover hook %s)\n",
		r.Runtime.Transferred>>20, r.Runtime.Iterations, r.Runtime.Total.Round(time.Millisecond), r.Pause, r.Runtime.Hook.Round(time.Millisecond))
	fmt.Fprintf(w, "disk: %d MiB sent to the destination; digest %s, source = destination: %v (%d MiB hashed before the pause, %d MiB in it, %d chunks)\n",
		r.DiskWire>>20, r.Digest, r.DigestMatch, r.DigestRead>>20, r.VerifyRead>>20, r.VerifyChunks)
	if r.DiskRounds > 0 {
		fmt.Fprintf(w, "disk (chunked engine): %d rounds, %d connection cuts resumed, %d chunks sent inside the pause\n",
			r.DiskRounds, r.DiskCuts, r.VerifyChunks)
	}
	fmt.Fprintf(w, "dns: %v -> %v\n", r.DNSBefore, r.DNSAfter)
	fmt.Fprintf(w, "client probe: %d requests, %d answered, %d reconnects\n", o.Sent, o.Got, o.Reconnects)
	fmt.Fprintf(w, "client-visible disruption (packet capture, %d packets): %s in %d gaps, longest %s\n",
		o.Captured, o.Packets.Total.Round(time.Millisecond), o.Packets.Gaps, o.Packets.Longest.Round(time.Millisecond))
	var gaps []string
	for _, g := range o.Packets.Worst {
		gaps = append(gaps, fmt.Sprintf("%s (%s, at %s)", g.Length.Round(time.Millisecond),
			o.phaseAt(g.Start), g.Start.Sub(o.Start).Round(100*time.Millisecond)))
	}
	fmt.Fprintf(w, "  longest gaps: %s\n  (gaps over %s count, minus the %s probe interval)\n",
		strings.Join(gaps, ", "), o.Packets.Threshold, o.Packets.Interval)
	fmt.Fprintf(w, "  outages (gaps over %s only): %s in %d\n", o.Packets.OutageThreshold, o.Packets.Outage.Round(time.Millisecond), o.Packets.Outages)
	fmt.Fprintf(w, "redirect drained after %s\n", o.Drained.Round(time.Millisecond))
}
