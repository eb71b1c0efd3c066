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
	Dimension string             `json:"dimension"` // "guest_ram_mib", "disk_data_mib", "echo_conns"
	Value     int64              `json:"value"`
	Err       string             `json:"error,omitempty"`
	Metrics   map[string]float64 `json:"metrics"`
}

// scalePoints are the scaling flag's points (one dimension at a time).
// Two VMs moved at once is not measured: labrun moves the lab's one VM.
var scalePoints = []struct {
	dim  string
	vals []int64
}{
	{"guest_ram_mib", []int64{128, 256}},
	{"disk_data_mib", []int64{64, 256, 1024}},
	{"echo_conns", []int64{10, 100, 1000}},
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
	for _, sp := range scalePoints {
		for _, v := range sp.vals {
			sc := *base
			switch sp.dim {
			case "guest_ram_mib":
				sc.RAMMiB = int(v)
			case "disk_data_mib":
				sc.Fill = units.ByteSize(v << 20)
				sc.Disk = max(sc.Disk, units.ByteSize(2*v<<20))
			case "echo_conns":
				sc.Conns = int(v)
			}
			fmt.Fprintf(os.Stderr, "== scaling %s=%d (%s since start)\n", sp.dim, v, time.Since(t0).Round(time.Second))
			r, err := runOne(context.Background(), &sc, modeEBPF, 1, dir, log)
			p := ScalePoint{Dimension: sp.dim, Value: v, Metrics: r.Metrics}
			if err != nil {
				p.Err = err.Error()
			}
			pts = append(pts, p)
		}
	}
	j, err := json.MarshalIndent(map[string]any{"date": t0.UTC().Format(time.RFC3339), "commit": commit(), "host": host(),
		"base": base.describe(), "points": pts, "not_measured": "two VMs moved at once (labrun moves the lab's one VM)"}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "scale.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("| dimension | value | vm_pause_ms | disruption_total_ms | echo_gap_longest_ms | total_move_ms | error |\n| --- | --- | --- | --- | --- | --- | --- |\n")
	for _, p := range pts {
		fmt.Fprintf(&b, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %s |\n", p.Dimension, p.Value, p.Metrics["vm_pause_ms"],
			p.Metrics["disruption_total_ms"], p.Metrics["echo_gap_longest_ms"], p.Metrics["total_move_ms"], p.Err)
	}
	b.WriteString("\nNot measured: two VMs moved at once (labrun moves the lab's one VM).\n")
	return os.WriteFile(filepath.Join(dir, "scale.md"), []byte(b.String()), 0o644)
}
