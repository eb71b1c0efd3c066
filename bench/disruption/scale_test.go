package main

import (
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/labrun"
)

func TestParsePointList(t *testing.T) {
	got, err := parsePointList("conns=1000, disk_data_mib=1024,ram=256,")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"echo_conns=1000", "disk_data_mib=1024", "guest_ram_mib=256"} {
		if !got[n] {
			t.Errorf("%s not selected: %v", n, got)
		}
	}
	if len(got) != 3 {
		t.Errorf("selected %v, want 3 points", got)
	}
	if got, err := parsePointList(""); err != nil || len(got) != 0 {
		t.Errorf("empty list: %v, %v", got, err)
	}
	// A typo names the points there are instead of running nothing.
	for _, bad := range []string{"conns=999", "echo_conn=1000", "conns", "vms=3"} {
		_, err := parsePointList(bad)
		if err == nil || !strings.Contains(err.Error(), "echo_conns=1000") {
			t.Errorf("%q: err = %v, want one listing the points", bad, err)
		}
	}
}

// The scaling run as first committed (f818a2f, 2026-11-30, a file from
// before per-point dates): its 1000-connection point failed; a rerun of
// that point alone is merged into it. A copy under testdata, so that
// reruns merged into the committed directory do not change this test.
func TestMergeScaleRerunsOnePoint(t *testing.T) {
	prev, err := readScaleFile("testdata/scale-old-format.json")
	if err != nil || prev == nil {
		t.Fatalf("read the committed file: %v, %v", prev, err)
	}
	if len(prev.Points) != 8 {
		t.Fatalf("committed file has %d points, want 8", len(prev.Points))
	}
	// Points of a file from before per-point dates get the file's.
	if p := prev.Points[0]; p.Date != prev.Date || p.Commit != prev.Commit {
		t.Fatalf("old point not dated from its file: %+v", p)
	}
	if prev.Command == "" || !strings.Contains(prev.Command, "-disk 512MiB -fill 256MiB") ||
		!strings.Contains(prev.Command, "-scale-skip disk_data_mib=1024") {
		t.Fatalf("old file's command not rebuilt: %q", prev.Command)
	}
	// This run: echo_conns=1000 alone (-scale-only), the rest not run, and
	// a point the old file does not have is not invented.
	var now []ScalePoint
	for _, p := range prev.Points {
		q := ScalePoint{Dimension: p.Dimension, Value: p.Value, EchoEvery: p.EchoEvery, Note: "not run (not in -scale-only)"}
		if p.Name() == "echo_conns=1000" {
			q = ScalePoint{Dimension: p.Dimension, Value: p.Value, EchoEvery: 1000, Date: "2026-11-30T20:30:00Z", Commit: "abc1234",
				EchoSpread: true, Metrics: map[string]float64{"vm_pause_ms": 300, "total_move_ms": 70000, "echo_reconnects": 0}}
		}
		now = append(now, q)
	}
	nf := &ScaleFile{Date: "2026-11-30T20:30:00Z", Commit: "abc1234", Host: "2 cores", Took: "3m", Base: prev.Base,
		Command: "go run ./bench/disruption -scale -disk 512MiB -fill 256MiB -scale-only conns=1000", Points: now, NotMeasured: "x"}
	f := mergeScale(prev, nf, []string{"echo_conns=1000"})

	if f.Date != prev.Date || f.Commit != prev.Commit || f.Command != prev.Command {
		t.Errorf("the file's first run changed: %s %s %q", f.Date, f.Commit, f.Command)
	}
	if len(f.Updates) != 1 || f.Updates[0].Commit != "abc1234" || strings.Join(f.Updates[0].Points, ",") != "echo_conns=1000" {
		t.Errorf("updates = %+v", f.Updates)
	}
	if len(f.Points) != len(prev.Points) {
		t.Fatalf("%d points after the merge, want %d", len(f.Points), len(prev.Points))
	}
	for i, p := range f.Points {
		old := prev.Points[i]
		if p.Name() != old.Name() {
			t.Fatalf("point %d is %s, was %s: order changed", i, p.Name(), old.Name())
		}
		if p.Name() == "echo_conns=1000" {
			if p.Err != "" || p.Metrics["vm_pause_ms"] != 300 || p.Commit != "abc1234" {
				t.Errorf("rerun point not taken: %+v", p)
			}
			continue
		}
		// Kept as it was: its numbers, its note (the skipped one's, the
		// copied one's), its date.
		if p.Note != old.Note || p.Err != old.Err || p.Date != old.Date || p.Metrics["total_move_ms"] != old.Metrics["total_move_ms"] {
			t.Errorf("%s not kept: %+v, was %+v", p.Name(), p, old)
		}
	}

	md := f.Markdown()
	for _, want := range []string{
		"Rerun into this file on 2026-11-30T20:30:00Z: echo_conns=1000 (commit abc1234",
		"| echo_conns | 1000 | 1000 ms | 300 ms |",
		"measured 2026-11-30T20:30:00Z at commit abc1234",
		"| guest_ram_mib | 128 | 10 ms | 279 ms |",
		"| disk_data_mib | 1024 | 10 ms | | | | | | | | not run (-scale-skip) |",
		"Measured so: echo_conns=1000. Measured before, every connection in step",
		"sudo make bench BENCH_FLAGS='-scale -disk 512MiB -fill 256MiB -scale-skip disk_data_mib=1024'",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("scale.md lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "qmp: monitor closed") {
		t.Errorf("the failed point's old error is still in the table:\n%s", md)
	}

	// A second merge appends a second update and keeps the first.
	f2 := mergeScale(f, nf, []string{"echo_conns=1000"})
	if len(f2.Updates) != 2 || len(f.Updates) != 1 {
		t.Errorf("updates after a second merge: %d (the first file's: %d)", len(f2.Updates), len(f.Updates))
	}
}

// A point another version added (not in this code's scalePoints) stays;
// a point this run skipped keeps the measurement the file had; a new
// file is this run's.
func TestMergeScaleKeepsUnknownAndSkipped(t *testing.T) {
	m := func(v float64) map[string]float64 { return map[string]float64{"total_move_ms": v} }
	prev := &ScaleFile{Date: "d0", Commit: "c0", Points: []ScalePoint{
		{Dimension: "echo_conns", Value: 10, Metrics: m(1), Date: "d0", Commit: "c0"},
		{Dimension: "vms_at_once", Value: 2, Metrics: m(2), Date: "d0", Commit: "c0"},
	}}
	now := &ScaleFile{Date: "d1", Commit: "c1", Points: []ScalePoint{
		{Dimension: "echo_conns", Value: 10, Note: "not run (-scale-skip)"},
		{Dimension: "echo_conns", Value: 100, Metrics: m(3), Date: "d1", Commit: "c1"},
	}}
	f := mergeScale(prev, now, []string{"echo_conns=100"})
	var names []string
	for _, p := range f.Points {
		names = append(names, p.Name())
	}
	if got := strings.Join(names, " "); got != "echo_conns=10 echo_conns=100 vms_at_once=2" {
		t.Fatalf("points = %s", got)
	}
	if p := f.Points[0]; p.Note != "" || p.Metrics["total_move_ms"] != 1 {
		t.Errorf("skipped point lost its measurement: %+v", p)
	}
	if p := f.Points[2]; p.Metrics["total_move_ms"] != 2 {
		t.Errorf("another version's point lost: %+v", p)
	}
	if got := mergeScale(nil, now, nil); got != now {
		t.Errorf("no file: the merge is not this run")
	}
}

func TestBaseDiff(t *testing.T) {
	a := Scenario{Name: "standard", Repeats: 3, GuestRAMMiB: 128, DiskMiB: 512, DiskDataMiB: 256, SpecFile: "a.yaml"}
	b := a
	b.Name, b.Repeats, b.SpecFile = "other", 1, "b.yaml"
	if d := baseDiff(a, b); len(d) != 0 {
		t.Errorf("name, repeats, spec path count as differences: %v", d)
	}
	b.DiskMiB, b.DiskDataMiB = 2048, 1024
	d := baseDiff(a, b)
	if len(d) != 2 || !strings.HasPrefix(d[0], "disk_data_mib (256 there, 1024 here)") || !strings.HasPrefix(d[1], "disk_mib") {
		t.Errorf("diff = %v", d)
	}
}

func TestMarkdownSourceAfterFailure(t *testing.T) {
	f := &ScaleFile{Date: "d", Commit: "c", Points: []ScalePoint{{Dimension: "echo_conns", Value: 1000, EchoEvery: 1000, Date: "d", Commit: "c",
		Err: "disk-bulk: mirror: qmp: monitor closed\nundo: x", Metrics: map[string]float64{},
		Source: &labrun.SourceState{QEMU: "exited: exit status 0", QMPStatus: "unreachable", Console: "Kernel panic - not syncing: System is deadlocked on memory",
			DNS: "10.1.0.10", DNSUnchanged: true}}}}
	md := f.Markdown()
	row := ""
	for _, l := range strings.Split(md, "\n") {
		if strings.HasPrefix(l, "| echo_conns | 1000 |") {
			row = l
		}
	}
	for _, want := range []string{"monitor closed; undo: x", "the source after the failure: NOT SAFE: QEMU exited: exit status 0",
		`guest console: "Kernel panic - not syncing: System is deadlocked on memory"`, "DNS 10.1.0.10 (unchanged)"} {
		if !strings.Contains(row, want) {
			t.Errorf("row lacks %q: %s", want, row)
		}
	}
}

// The committed scaling directory takes a rerun made with its command's
// flags (-disk 512MiB -fill 256MiB, the rest defaults): the base this
// code describes is the one it holds.
func TestCommittedScaleBaseMatches(t *testing.T) {
	saved := flags
	defer func() { flags = saved }()
	flags.name, flags.disk, flags.fill, flags.rate, flags.ram, flags.conns, flags.bulk = "standard", "512MiB", "256MiB", "100mbit", 128, 4, "8mbit"
	flags.giveUp, flags.repeats, flags.modes, flags.spec, flags.controlWindow = 2*time.Second, 3, "vmhop-ebpf", "../../configs/lab-migration.yaml", 100*time.Second
	sc, err := parse()
	if err != nil {
		t.Fatal(err)
	}
	prev, err := readScaleFile("../results/2026-11-30-scaling/scale.json")
	if err != nil || prev == nil {
		t.Fatal(prev, err)
	}
	if d := baseDiff(prev.Base, sc.describe()); len(d) != 0 {
		t.Errorf("the committed base differs from the flags' in %v", d)
	}
	flags.fill = "1GiB"
	sc, _ = parse()
	if d := baseDiff(prev.Base, sc.describe()); len(d) != 1 || !strings.HasPrefix(d[0], "disk_data_mib") {
		t.Errorf("another -fill: diff %v", d)
	}
}
