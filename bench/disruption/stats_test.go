package main

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/labrun"
)

func TestSummarize(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want Stat
	}{
		{[]float64{3, 1, 2}, Stat{N: 3, Min: 1, Median: 2, Max: 3}},
		{[]float64{4, 1, 2, 3}, Stat{N: 4, Min: 1, Median: 2.5, Max: 4}},
		{[]float64{math.NaN(), 5}, Stat{N: 1, Min: 5, Median: 5, Max: 5}},
		{nil, Stat{}},
	} {
		if got := Summarize(c.in); got != c.want {
			t.Errorf("Summarize(%v) = %+v, want %+v", c.in, got, c.want)
		}
	}
}

// TestAggregateRatios: failed runs count in no statistic, a metric a run
// did not measure only in its own; ratios are of medians, where the
// denominator is not 0.
func TestAggregateRatios(t *testing.T) {
	runs := []RunResult{
		{Metrics: map[string]float64{"vm_pause_ms": 100, "ping_lost": 0, "new_addr_after_stop_ms": 900}},
		{Metrics: map[string]float64{"vm_pause_ms": 300, "ping_lost": 0}},
		{Metrics: map[string]float64{"vm_pause_ms": 200, "ping_lost": 0, "new_addr_after_stop_ms": 700}},
		{Err: "boom", Metrics: map[string]float64{"vm_pause_ms": 1e9}},
	}
	st := Aggregate(runs)
	if st["vm_pause_ms"] != (Stat{N: 3, Min: 100, Median: 200, Max: 300}) {
		t.Errorf("vm_pause_ms %+v", st["vm_pause_ms"])
	}
	if st["new_addr_after_stop_ms"] != (Stat{N: 2, Min: 700, Median: 800, Max: 900}) {
		t.Errorf("new_addr_after_stop_ms %+v", st["new_addr_after_stop_ms"])
	}
	if _, ok := st["tcp_resets"]; ok {
		t.Error("a metric no run measured has statistics")
	}
	fc := map[string]Stat{"vm_pause_ms": {N: 3, Median: 30000}, "ping_lost": {N: 3, Median: 2000}}
	r := Ratios(fc, st)
	if r["vm_pause_ms"] != 150 {
		t.Errorf("ratio %v, want 150", r["vm_pause_ms"])
	}
	if _, ok := r["ping_lost"]; ok {
		t.Error("ratio over a zero median")
	}
}

// TestCompute: a run's metrics from the client's view and its capture.
func TestCompute(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := time.Millisecond
	v := labrun.ClientView{Start: t0.Add(-time.Second), End: t0.Add(10 * time.Second),
		Echo: []labrun.EchoView{
			{Reconnects: 1, Disruption: labrun.Disruption{Total: 500 * ms, Outage: 400 * ms, Longest: 410 * ms}},
			{Disruption: labrun.Disruption{Total: 100 * ms, Outage: 0, Longest: 60 * ms}},
		},
		HTTP: labrun.HTTPView{Failed: 3, FailWindow: 700 * ms, NewAddrAt: 4 * time.Second},
		Ping: labrun.PingView{Lost: 7},
		Bulk: labrun.BulkView{Bytes: 1 << 20, Conns: []labrun.BulkConn{{Port: 41000}}}}
	c := &Capture{Retransmits: 9, RTORetransmits: 2, Resets: 1, WireBytes: 5000, Conns: map[ConnKey]*ConnStats{
		{41000, 80}: {Progress: []time.Time{t0, t0.Add(10 * ms), t0.Add(2 * time.Second), t0.Add(10 * time.Second)},
			Arrivals: []time.Time{t0, t0.Add(5 * time.Second)}}}}
	d := runData{Start: t0, Stopped: t0.Add(2 * time.Second), Pause: 150 * ms, Total: 20 * time.Second, View: v,
		MigrationWire: 1 << 30, Capture: c, Bulk: bulkPorts(v)}
	m := compute(d)
	want := map[string]float64{"vm_pause_ms": 150, "disruption_total_ms": 500, "disruption_outage_ms": 400, "echo_gap_longest_ms": 410,
		"echo_gap_total_mean_ms": 300, "echo_reconnects": 1, "http_failed": 3, "http_fail_window_ms": 700,
		"new_addr_after_stop_ms": 1000, "ping_lost": 7, "bulk_received_bytes": 1 << 20, "tcp_retransmits": 9,
		"tcp_rto_retransmits": 2, "tcp_resets": 1, "client_wire_bytes": 5000, "migration_wire_bytes": 1 << 30,
		"total_move_ms": 20000, "bulk_gap_longest_ms": 8000}
	for k, w := range want {
		if m[k] != w {
			t.Errorf("%s = %v, want %v", k, m[k], w)
		}
	}
	// With the capture's echo connections, gaps are the capture's:
	// deliveries of new bytes on the connection's ports (a reconnect
	// joins two), from the first delivery to the end of the load.
	v.Echo[0].Ports = []uint16{42000, 42001}
	c.Conns[ConnKey{42000, 7}] = &ConnStats{Progress: []time.Time{t0, t0.Add(10 * ms)}, Arrivals: []time.Time{t0.Add(time.Second)}}
	c.Conns[ConnKey{42001, 7}] = &ConnStats{Progress: []time.Time{t0.Add(3010 * ms), t0.Add(10 * time.Second)}}
	d.View = v
	m = compute(d)
	if m["echo_gap_longest_ms"] != 7000-10 || m["disruption_total_ms"] != 7000-10-10+3000-10 {
		t.Errorf("from the capture: longest %v, total %v; want 6990, 9970", m["echo_gap_longest_ms"], m["disruption_total_ms"])
	}
	// Without a resume time the pause is the instant the VM stopped (2 s):
	// the 3 s gap spans it, the 10 ms one ended before.
	if m["echo_gap_switchover_ms"] != 3000 || m["echo_gap_copy_longest_ms"] != 10 {
		t.Errorf("switchover %v, copy %v; want 3000, 10", m["echo_gap_switchover_ms"], m["echo_gap_copy_longest_ms"])
	}
	for k := range m {
		found := false
		for _, mt := range metrics {
			found = found || mt.Name == k
		}
		if !found {
			t.Errorf("metric %s is not in the list (no description)", k)
		}
	}
}

func sampleResults() *Results {
	st := map[string]Stat{"vm_pause_ms": {N: 3, Min: 90, Median: 100, Max: 180}, "migration_wire_bytes": {N: 3, Min: 1 << 30, Median: 1 << 30, Max: 1 << 30}}
	fc := map[string]Stat{"vm_pause_ms": {N: 3, Min: 30000, Median: 31000, Max: 35000}}
	return &Results{Date: "2026-11-30T00:00:00Z", Commit: "abc", Host: "2 cores",
		Scenario: Scenario{Name: "standard", Repeats: 3, EchoEveryMs: 10, GuestRAMMiB: 128},
		Metrics:  metrics,
		Modes: []ModeResult{
			{Mode: modeFreeze, Stats: fc, Runs: []RunResult{{Repeat: 1, PcapSummary: "10 packets\n"}}},
			{Mode: modeEBPF, Stats: st, Runs: []RunResult{{Repeat: 1}, {Repeat: 2, Err: "boom"}}},
			{Mode: modeUserspace, Runs: []RunResult{{Repeat: 1, Err: "tunnel down"}}},
		},
		RatioFreezeOverVmhop: Ratios(fc, st)}
}

// TestMarkdownAndWrite: the table gives median (min-max) with units, the
// ratio, "-" for a mode without a good run, failed runs; the JSON
// carries every metric's name with its unit.
func TestMarkdownAndWrite(t *testing.T) {
	r := sampleResults()
	md := r.Markdown()
	for _, want := range []string{
		"| `vm_pause_ms` | 31.0 s (30.0 s-35.0 s) | 100 ms (90 ms-180 ms) | - | **310-fold** |",
		"| `migration_wire_bytes` | - | 1024.0 MiB | - | - |",
		"(1 of 1 runs failed, left out of the statistics)",
		"(1 of 2 runs failed, left out of the statistics)",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	dir := t.TempDir()
	if err := r.Write(dir); err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	j, _ := os.ReadFile(filepath.Join(dir, "results.json"))
	if err := json.Unmarshal(j, &back); err != nil {
		t.Fatal(err)
	}
	ratio := back["ratio_freeze_over_vmhop_median"].(map[string]any)
	if ratio["vm_pause_ms"].(float64) != 310 {
		t.Errorf("ratio in json: %v", ratio)
	}
	ps, _ := os.ReadFile(filepath.Join(dir, "pcap-summary.txt"))
	if !strings.Contains(string(ps), "== freeze-and-copy, run 1\n10 packets") || !strings.Contains(string(ps), "FAILED: boom") {
		t.Errorf("pcap summary:\n%s", ps)
	}
}

// TestPlots: the timeline and the bar chart are PNG images.
func TestPlots(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Unix(1000, 0)
	var s []Sample
	for i := range 500 {
		lat := time.Duration(30+i%50) * time.Millisecond
		if i%97 == 0 {
			lat = -1
		}
		s = append(s, Sample{At: t0.Add(time.Duration(i) * 10 * time.Millisecond), Latency: lat, Kind: []string{"echo", "icmp"}[i%2]})
	}
	ph := []PhaseMs{{Name: "disk-bulk", FromMs: 0, ToMs: 2000}, {Name: "memory", FromMs: 2000, ToMs: 4500}}
	tl := filepath.Join(dir, "t.png")
	if err := Timeline(tl, "test", t0, s, ph); err != nil {
		t.Fatal(err)
	}
	bars := filepath.Join(dir, "b.png")
	if err := Bars(bars, sampleResults().Modes, barMetrics); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{tl, bars} {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) || len(b) < 5000 {
			t.Errorf("%s: %d bytes, err %v, not a PNG image", f, len(b), err)
		}
	}
}

// TestComputeControl: a control run (nothing moved) has the client's
// metrics (the echo gaps: the guest's floor; the window's round trips)
// and none of a move's: no pause, move time, wire bytes or new address,
// so its table cells are "-" and its bars absent.
func TestSplitGaps(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms ...int) []time.Time {
		var out []time.Time
		for _, m := range ms {
			out = append(out, t0.Add(time.Duration(m)*time.Millisecond))
		}
		return out
	}
	stop, resume := t0.Add(100*time.Millisecond), t0.Add(400*time.Millisecond)
	for _, c := range []struct {
		name           string
		arr            []time.Time
		across, before time.Duration
	}{
		{"one gap holds the pause", at(0, 10, 40, 500, 510), 460 * time.Millisecond, 30 * time.Millisecond},
		{"a reply inside the pause splits it", at(0, 10, 250, 900), 650 * time.Millisecond, 10 * time.Millisecond},
		{"a gap ending exactly at the stop is before it", at(0, 100, 130), 30 * time.Millisecond, 100 * time.Millisecond},
		{"after the resume is neither", at(0, 10, 420, 430, 2000), 410 * time.Millisecond, 10 * time.Millisecond},
		// No reply at all: from the load's start to its end.
		{"nothing answered", nil, 5 * time.Second, 0},
	} {
		from := time.Time{}
		if c.arr == nil {
			from = t0
		}
		a, b := splitGaps(c.arr, from, t0.Add(5*time.Second), t0.Add(-time.Second), stop, resume)
		if c.arr != nil {
			// The end of the load bounds the last gap; it starts after the resume.
			a, b = splitGaps(c.arr, from, time.Time{}, t0.Add(-time.Second), stop, resume)
		}
		if a != c.across || b != c.before {
			t.Errorf("%s: across %v before %v; want %v, %v", c.name, a, b, c.across, c.before)
		}
	}
	// Gaps that ended before the move started are the lead-in's.
	if _, b := splitGaps(at(0, 60, 70), time.Time{}, time.Time{}, t0.Add(65*time.Millisecond), stop, resume); b != 10*time.Millisecond {
		t.Errorf("before the start counted: %v, want 10ms", b)
	}
}

func TestComputeControl(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := time.Millisecond
	v := labrun.ClientView{Start: t0.Add(-time.Second), End: t0.Add(103 * time.Second),
		Echo: []labrun.EchoView{{Disruption: labrun.Disruption{Total: 900 * ms, Outage: 300 * ms, Longest: 150 * ms}}},
		HTTP: labrun.HTTPView{NewAddrAt: 4 * time.Second}}
	var samples []Sample
	for i := range 100 {
		samples = append(samples, Sample{At: t0.Add(time.Duration(i) * time.Second), Latency: time.Duration(20+i%3) * ms, Kind: "icmp"})
	}
	d := runData{Start: t0, Stopped: t0.Add(100 * time.Second), View: v, NoMove: true, Capture: &Capture{Samples: samples}}
	m := compute(d)
	for _, k := range []string{"vm_pause_ms", "total_move_ms", "migration_wire_bytes", "new_addr_after_stop_ms"} {
		if x, ok := m[k]; ok {
			t.Errorf("control run has %s = %v", k, x)
		}
	}
	if m["disruption_total_ms"] != 900 || m["disruption_outage_ms"] != 300 || m["echo_gap_longest_ms"] != 150 {
		t.Errorf("echo: total %v outage %v longest %v; want 900, 300, 150", m["disruption_total_ms"], m["disruption_outage_ms"], m["echo_gap_longest_ms"])
	}
	if m["ping_rtt_copy_median_ms"] != 21 || m["ping_rtt_copy_p99_ms"] != 22 {
		t.Errorf("window's ping: median %v p99 %v; want 21, 22", m["ping_rtt_copy_median_ms"], m["ping_rtt_copy_p99_ms"])
	}
	// In the results: its column shows "-" for a move's metrics, the ratio
	// stays freeze-and-copy's over vmhop-ebpf's.
	r := sampleResults()
	r.Scenario.ControlWindowMs = 100000
	r.Modes = append([]ModeResult{{Mode: modeControl, Stats: Aggregate([]RunResult{{Repeat: 1, Metrics: m}}), Runs: []RunResult{{Repeat: 1}}}}, r.Modes...)
	md := r.Markdown()
	for _, want := range []string{
		"| `vm_pause_ms` | - | 31.0 s (30.0 s-35.0 s) | 100 ms (90 ms-180 ms) | - | **310-fold** |",
		"| `disruption_total_ms` | 900 ms | - | - | - | - |",
		"`control` moves nothing: the same lab and load for 100.0 s",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	if err := Bars(filepath.Join(t.TempDir(), "b.png"), r.Modes, barMetrics); err != nil {
		t.Fatal(err)
	}
}

func TestParseMode(t *testing.T) {
	ms, err := parseMode("vmhop-ebpf@70mbit")
	if err != nil || ms.base != modeEBPF || ms.budget.BytesPerSecond() != 70e6/8 {
		t.Errorf("vmhop-ebpf@70mbit: %+v %v", ms, err)
	}
	if ms, err := parseMode(modeFreeze); err != nil || ms != (modeSpec{base: modeFreeze}) {
		t.Errorf("freeze: %+v %v", ms, err)
	}
	ms, err = parseMode("vmhop-ebpf+pacing=off+cc=bbr")
	if err != nil || ms != (modeSpec{base: modeEBPF, pacing: "off", cc: "bbr"}) {
		t.Fatalf("levers: %+v %v", ms, err)
	}
	spec := config.DefaultMigration()
	ms.apply(&spec)
	if spec.Limits.Pacing != "off" || spec.Limits.Congestion != "bbr" || spec.Limits.Bandwidth != config.DefaultMigration().Limits.Bandwidth {
		t.Errorf("applied: %+v", spec.Limits)
	}
	spec.Limits.Congestion = "reno"
	(modeSpec{base: modeEBPF, pacing: "budget", cc: "default"}).apply(&spec)
	if spec.Limits.Pacing != "budget" || spec.Limits.Congestion != "" {
		t.Errorf("pacing on, host's congestion control: %+v", spec.Limits)
	}
	if ms, err := parseMode(modeControl); err != nil || ms != (modeSpec{base: modeControl}) {
		t.Errorf("control: %+v %v", ms, err)
	}
	for _, bad := range []string{"vmhop", "freeze-and-copy@70mbit", "freeze-and-copy+pacing=on", "control@70mbit", "control+pacing=off", "vmhop-ebpf@70mb", "vmhop-ebpf@",
		"vmhop-ebpf+pacing=on", "vmhop-ebpf+cc=", "vmhop-ebpf+fq"} {
		if _, err := parseMode(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestRTTMetrics: ICMP before the move is the baseline; ICMP and echo
// from the start until the VM stopped at A are the copy's; unanswered
// probes and later ones are left out.
func TestRTTMetrics(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := time.Millisecond
	var s []Sample
	s = append(s, Sample{At: t0.Add(-500 * ms), Latency: 35 * ms, Kind: "icmp"}, Sample{At: t0.Add(-2 * time.Second), Latency: 900 * ms, Kind: "icmp"})
	for i := range 100 {
		s = append(s, Sample{At: t0.Add(time.Duration(i) * 10 * ms), Latency: time.Duration(40+i) * ms, Kind: "icmp"},
			Sample{At: t0.Add(time.Duration(i) * 10 * ms), Latency: time.Duration(50+i) * ms, Kind: "echo"})
	}
	s = append(s, Sample{At: t0.Add(500 * ms), Latency: -1, Kind: "icmp"}, Sample{At: t0.Add(2 * time.Second), Latency: 5 * time.Second, Kind: "echo"})
	m := rttMetrics(s, t0, t0.Add(time.Second))
	want := map[string]float64{"ping_rtt_before_ms": 35, "ping_rtt_copy_median_ms": 89, "ping_rtt_copy_p99_ms": 138, "echo_rtt_copy_p99_ms": 148}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, m[k], v, m)
		}
	}
	if m := rttMetrics(nil, t0, t0.Add(time.Second)); len(m) != 0 {
		t.Errorf("no samples: %v", m)
	}
}
