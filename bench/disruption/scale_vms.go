package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
)

// The scaling point "two VMs migrated at once" (dimension vms=2): the
// base scenario's guest (vm) and a second one like it (vm2: its own
// disk with the same data, its own addresses and DNS name, svc2), both
// moved from site A to site B at the same time through the two vmhopd
// (two jobs handed to site A's vmhopd together; site B's vmhopd serves
// both on ports of their own from migration_ports). They share the site
// links: each has the spec's budget, which the links cannot carry twice.
//
// The first VM carries the standard load and the capture (its traffic
// only: the filter names its two addresses), so its metrics are the
// other points' metrics. The second carries a probe: one echo
// connection at 100 Hz and ICMP every 10 ms, timed by the client's own
// receive times; its metrics are prefixed vm2_.

// vmsFilter is the capture of the first VM's traffic only.
var vmsFilter = fmt.Sprintf("(host %s or host %s) and (%s)", lab.OldIP, lab.NewIP, captureFilter)

// vm2Metrics are the second VM's measurements (its load is a probe).
var vm2Metrics = []metric{
	{"vm2_vm_pause_ms", "the second VM's pause (QEMU)"},
	{"vm2_total_move_ms", "the second VM's whole move (its migration's total)"},
	{"vm2_echo_gap_longest_ms", "the second VM's echo probe: longest gap (client receive times, 100 Hz)"},
	{"vm2_echo_unanswered", "the second VM's echo probe: lines never answered"},
	{"vm2_ping_lost", "the second VM's ICMP echoes (every 10 ms) never answered"},
	{"vm2_ping_gap_longest_ms", "the second VM's ICMP echo: longest gap"},
	{"vm2_migration_wire_bytes", "bytes the second VM's move sent between the sites"},
}

// runTwoVMs runs the point once: metrics of the first VM as runOne
// computes them, plus vm2Metrics. Its guest line says both guests'
// accounts.
func runTwoVMs(ctx context.Context, sc *scenario, log *slog.Logger) (RunResult, error) {
	r := RunResult{Repeat: 1, Metrics: map[string]float64{}}
	l, err := lab.Up(ctx, lab.Config{Name: flags.labName, Links: sc.Links})
	if err != nil {
		return r, err
	}
	defer l.Down()
	vm1, err := l.StartVM(ctx, lab.VMConfig{MemMiB: sc.RAMMiB, DiskSize: sc.Disk, Prefill: sc.Fill})
	if err != nil {
		return r, err
	}
	vm2, err := l.StartVM(ctx, labrun.SecondVM(sc.RAMMiB, sc.Disk, sc.Fill))
	if err != nil {
		return r, err
	}
	for _, vm := range []*lab.VM{vm1, vm2} {
		if err := l.WaitGuest(ctx, vm.IP, 180*time.Second); err != nil {
			return r, fmt.Errorf("%s: %w", vm.Name, err)
		}
	}
	spec := *sc.Spec
	moves := []labrun.Move{
		{VM: vm1, Spec: &spec, Shape: sc.shape()},
		{VM: vm2, Spec: labrun.SecondSpec(&spec), Shape: &labrun.Load{Conns: 1, HTTPEvery: -1}, Uncaptured: true},
	}
	outs, merr := labrun.MigrateConcurrent(ctx, l, moves, vmsFilter, log)
	d := live(outs[0])
	if outs[0].Pcap != "" {
		if c, err := AnalyzeFile(outs[0].Pcap, serverPorts, labrun.EchoPort); err != nil {
			merr = fmt.Errorf("%v; capture: %w", merr, err)
		} else {
			d.Capture = c
			r.PcapSummary = c.Summary()
		}
	}
	d.Bulk = bulkPorts(d.View)
	d.EchoEvery = sc.echoEvery()
	r.Metrics = compute(d)
	r.start = d.Start
	for _, s := range d.Phases {
		r.Phases = append(r.Phases, PhaseMs{Name: s.Name, FromMs: msSince(d.Start, s.From), ToMs: msSince(d.Start, s.To)})
	}
	ms := func(x time.Duration) float64 { return float64(x) / float64(time.Millisecond) }
	o2 := outs[1]
	r.Metrics["vm2_vm_pause_ms"] = ms(o2.Report.Pause)
	r.Metrics["vm2_total_move_ms"] = ms(o2.Report.Total)
	var longest time.Duration
	var unanswered int
	for _, e := range o2.Client.Echo {
		longest = max(longest, e.Disruption.Longest)
		unanswered += e.Unanswered
	}
	r.Metrics["vm2_echo_gap_longest_ms"] = ms(longest)
	r.Metrics["vm2_echo_unanswered"] = float64(unanswered)
	r.Metrics["vm2_ping_lost"] = float64(o2.Client.Ping.Lost)
	r.Metrics["vm2_ping_gap_longest_ms"] = ms(o2.Client.Ping.Disruption.Longest)
	r.Metrics["vm2_migration_wire_bytes"] = float64(int64(o2.Report.Runtime.Transferred) + o2.Report.DiskWire)
	for i, o := range outs {
		g := o.Guest
		r.Guest += fmt.Sprintf("%s: same boot %v; RAM verifier %d lost, %d corrupt in %d checks; disk %s. ", moves[i].VM.Name,
			g.SameBoot, g.MemLost, g.MemCorrupt, g.MemCycles, g.Disk)
		if g.Problem != "" {
			r.Guest += "PROBLEM: " + g.Problem + ". "
		}
	}
	return r, merr
}
