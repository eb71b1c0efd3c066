package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

// ScalePoint is one scaling run: the standard scenario with one
// dimension changed, moved once by vmhop (eBPF redirect).
type ScalePoint struct {
	Dimension string             `json:"dimension"` // "guest_ram_mib", "disk_data_mib", "echo_conns", "vms"
	Value     int64              `json:"value"`
	EchoEvery float64            `json:"echo_every_ms"`
	Note      string             `json:"note,omitempty"` // a point not run: the same configuration as another, or skipped
	Err       string             `json:"error,omitempty"`
	Metrics   map[string]float64 `json:"metrics"`
}

// scalePoints are the scaling flag's points (one dimension at a time).
// Echo connections keep the total echo rate at 1000 requests/s: 10 at
// 100 Hz each, 100 at 10 Hz, 1000 at 1 Hz (the TCG guest's one vCPU
// answers them all); their gaps count over 3 intervals.
var scalePoints = []struct {
	dim  string
	vals []int64
}{
	{"guest_ram_mib", []int64{128, 256}},
	{"disk_data_mib", []int64{64, 256, 1024}},
	{"echo_conns", []int64{10, 100, 1000}},
	// Two VMs migrated at once (runTwoVMs: scale_vms.go); one is the base.
	{"vms", []int64{2}},
}

// scaling runs each point once and writes scale.json and scale.md.
func scaling(base *scenario) error {
	t0 := time.Now()
	dir := filepath.Join(flags.out, t0.UTC().Format("2006-01-02")+"-scaling")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var pts []ScalePoint
	ran := map[string]ScalePoint{} // by configuration: a point equal to one run already is not run again
	skip := map[string]bool{}
	for _, k := range strings.Split(flags.scaleSkip, ",") {
		if k != "" {
			skip[k] = true
		}
	}
	for _, sp := range scalePoints {
		for _, v := range sp.vals {
			sc := *base
			sc.KeepPcapMiB = 0
			switch sp.dim {
			case "guest_ram_mib":
				sc.RAMMiB = int(v)
			case "disk_data_mib":
				sc.Fill = units.ByteSize(v << 20)
				sc.Disk = max(sc.Disk, units.ByteSize(2*v<<20))
			case "echo_conns":
				sc.Conns = int(v)
				sc.EchoEvery = max(10*time.Millisecond, time.Duration(v)*time.Millisecond)
			}
			name := fmt.Sprintf("%s=%d", sp.dim, v)
			p := ScalePoint{Dimension: sp.dim, Value: v, EchoEvery: float64(sc.echoEvery()) / float64(time.Millisecond)}
			vms := int64(1)
			if sp.dim == "vms" {
				vms = v
			}
			key := fmt.Sprintf("ram %d, data %d, conns %d every %s, vms %d", sc.RAMMiB, sc.Fill, sc.Conns, sc.echoEvery(), vms)
			if skip[name] {
				p.Note = "not run (-scale-skip)"
				pts = append(pts, p)
				continue
			}
			if same, ok := ran[key]; ok {
				p.Metrics, p.Err, p.Note = same.Metrics, same.Err, fmt.Sprintf("the run of %s=%d (the same configuration)", same.Dimension, same.Value)
				pts = append(pts, p)
				continue
			}
			fmt.Fprintf(os.Stderr, "== scaling %s (%s since start)\n", name, time.Since(t0).Round(time.Second))
			var r RunResult
			var err error
			if vms > 1 {
				r, err = runTwoVMs(context.Background(), &sc, log)
			} else {
				r, err = runOne(context.Background(), &sc, modeEBPF, 1, dir, log)
			}
			p.Metrics = r.Metrics
			if err != nil {
				p.Err = err.Error()
			}
			fmt.Fprintf(os.Stderr, "   pause %.0f ms, disruption %.0f ms, longest echo gap %.0f ms, move %.1f s %s\n", r.Metrics["vm_pause_ms"],
				r.Metrics["disruption_total_ms"], r.Metrics["echo_gap_longest_ms"], r.Metrics["total_move_ms"]/1000, p.Err)
			if vms > 1 {
				fmt.Fprintf(os.Stderr, "   vm2: pause %.0f ms, move %.1f s, longest echo gap %.0f ms, pings lost %.0f; guests: %s\n", r.Metrics["vm2_vm_pause_ms"],
					r.Metrics["vm2_total_move_ms"]/1000, r.Metrics["vm2_echo_gap_longest_ms"], r.Metrics["vm2_ping_lost"], r.Guest)
			}
			ran[key] = p
			pts = append(pts, p)
		}
	}
	j, err := json.MarshalIndent(map[string]any{"date": t0.UTC().Format(time.RFC3339), "commit": commit(), "host": host(),
		"base": base.describe(), "took": time.Since(t0).Round(time.Second).String(), "points": pts}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "scale.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	var b strings.Builder
	bs := base.describe()
	fmt.Fprintf(&b, "# vmhop scaling, %s\n\nvmhop-ebpf (through the two vmhopd), once per point; the base: guest %d MiB RAM, %d MiB of data on a %d MiB disk, "+
		"%d echo connections at 100 Hz, site links %.0f Mbit/s, budget %.0f Mbit/s, disk stream %s; one dimension changed at a time. "+
		"Commit %s; host %s; took %s.\n\n", t0.UTC().Format(time.RFC3339), bs.GuestRAMMiB, bs.DiskDataMiB, bs.DiskMiB, bs.EchoConns,
		bs.SiteLinkBitS/1e6, bs.BudgetBitS/1e6, diskStream(bs), commit(), host(), time.Since(t0).Round(time.Second))
	b.WriteString("| dimension | value | echo every | vm_pause_ms | disruption_total_ms | echo_gap_longest_ms | echo_reconnects | ping_lost | total_move_ms | migration_wire_bytes | error or note |\n" +
		"| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, p := range pts {
		if p.Metrics == nil {
			fmt.Fprintf(&b, "| %s | %d | %.0f ms | | | | | | | | %s |\n", p.Dimension, p.Value, p.EchoEvery, p.Note)
			continue
		}
		fmt.Fprintf(&b, "| %s | %d | %.0f ms | %s | %s | %s | %.0f | %.0f | %s | %s | %s |\n", p.Dimension, p.Value, p.EchoEvery,
			fmtVal("vm_pause_ms", p.Metrics["vm_pause_ms"]), fmtVal("disruption_total_ms", p.Metrics["disruption_total_ms"]),
			fmtVal("echo_gap_longest_ms", p.Metrics["echo_gap_longest_ms"]), p.Metrics["echo_reconnects"], p.Metrics["ping_lost"],
			fmtVal("total_move_ms", p.Metrics["total_move_ms"]), fmtVal("migration_wire_bytes", p.Metrics["migration_wire_bytes"]), strings.ReplaceAll(p.Err, "\n", "; ")+p.Note)
	}
	b.WriteString("\n`disruption_total_ms`: worst echo connection, gaps over 3 intervals less the interval (30 ms at 100 Hz, 300 ms at 10 Hz, 3 s at 1 Hz).\n")
	for _, p := range pts {
		if p.Dimension == "vms" && p.Metrics != nil {
			b.WriteString(vmsTable(p))
		}
	}
	fmt.Fprintf(&b, "\nRerun: `sudo make bench BENCH_FLAGS='-scale -fill %s -scale-skip %s'` (or `go run ./bench/disruption -scale -fill %s -scale-skip %s`).\n",
		flags.fill, flags.scaleSkip, flags.fill, flags.scaleSkip)
	return os.WriteFile(filepath.Join(dir, "scale.md"), []byte(b.String()), 0o644)
}

// vmsTable is the two-VMs point per VM: the first VM's row has the
// standard load's metrics (the table above), the second a probe's.
func vmsTable(p ScalePoint) string {
	m := p.Metrics
	return fmt.Sprintf("\n`vms=2`: two VMs (each the base guest, its own disk and data, its own addresses and DNS name) moved at once through the two vmhopd, "+
		"sharing the site links (each migration has the spec's budget). vm carries the standard load and the capture (the row above); "+
		"vm2 one echo connection at 100 Hz and ICMP every 10 ms, timed by the client's receive times.\n\n"+
		"| VM | vm_pause_ms | total_move_ms | echo_gap_longest_ms | echo_reconnects (vm) / unanswered (vm2) | ping_lost | migration_wire_bytes |\n| --- | --- | --- | --- | --- | --- | --- |\n"+
		"| vm | %s | %s | %s | %.0f | %.0f | %s |\n| vm2 | %s | %s | %s | %.0f | %.0f | %s |\n",
		fmtVal("vm_pause_ms", m["vm_pause_ms"]), fmtVal("total_move_ms", m["total_move_ms"]), fmtVal("echo_gap_longest_ms", m["echo_gap_longest_ms"]),
		m["echo_reconnects"], m["ping_lost"], fmtVal("migration_wire_bytes", m["migration_wire_bytes"]),
		fmtVal("vm_pause_ms", m["vm2_vm_pause_ms"]), fmtVal("total_move_ms", m["vm2_total_move_ms"]), fmtVal("echo_gap_longest_ms", m["vm2_echo_gap_longest_ms"]),
		m["vm2_echo_unanswered"], m["vm2_ping_lost"], fmtVal("migration_wire_bytes", m["vm2_migration_wire_bytes"]))
}
