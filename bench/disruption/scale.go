package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/labrun"
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
	// Date and Commit are when and at which commit the point was
	// measured (a point merged in later differs from the file's).
	Date   string `json:"date,omitempty"`
	Commit string `json:"commit,omitempty"`
	// EchoSpread: the echo connections' sends were spread over their
	// interval (labrun.Load); false for points measured before, in
	// lockstep.
	EchoSpread bool `json:"echo_spread,omitempty"`
	// Source is the source VM's state after a failed move: whether the
	// failure left it safe (nil if the move did not fail).
	Source *labrun.SourceState `json:"source_after_failure,omitempty"`
	// EchoUp is how many echo connections had an answer when the move
	// started (0: not recorded, points measured before).
	EchoUp int `json:"echo_conns_up_at_start,omitempty"`
	// MemCheckMiB is the guest's RAM verifier's working set when not the
	// default 32 MiB (-scale-memcheck-mib).
	MemCheckMiB int `json:"guest_memcheck_mib,omitempty"`
}

// Name is the point as -scale-only and -scale-skip name it.
func (p ScalePoint) Name() string { return fmt.Sprintf("%s=%d", p.Dimension, p.Value) }

// measured says whether this run made the point (or copied it from a
// point of the same configuration it made): not merely skipped.
func (p ScalePoint) measured() bool { return p.Metrics != nil || p.Err != "" }

// ScaleFile is a scaling directory's scale.json: the first run's date,
// commit and command, the points (each with its own date and commit),
// and the later runs merged into it (-scale-only).
type ScaleFile struct {
	Date        string        `json:"date"`
	Commit      string        `json:"commit"`
	Host        string        `json:"host"`
	Base        Scenario      `json:"base"`
	Took        string        `json:"took"`
	Command     string        `json:"command,omitempty"`
	Points      []ScalePoint  `json:"points"`
	NotMeasured string        `json:"not_measured,omitempty"` // what scaling leaves out, and why
	Updates     []ScaleUpdate `json:"updates,omitempty"`
}

// ScaleUpdate is a later run merged into a scaling directory: which
// points it measured again, when, at which commit.
type ScaleUpdate struct {
	Date    string   `json:"date"`
	Commit  string   `json:"commit"`
	Host    string   `json:"host"`
	Took    string   `json:"took"`
	Command string   `json:"command"`
	Points  []string `json:"points"`
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

// dimAliases are short names -scale-only and -scale-skip also take.
var dimAliases = map[string]string{"ram": "guest_ram_mib", "data": "disk_data_mib", "conns": "echo_conns"}

// parsePointList parses a comma-separated list of DIMENSION=VALUE
// (DIMENSION a scalePoints dimension or one of dimAliases) into the
// points' names; a point scalePoints does not hold is an error naming
// the ones it does, so a typo does not silently run nothing.
func parsePointList(s string) (map[string]bool, error) {
	known := map[string]bool{}
	var all []string
	for _, sp := range scalePoints {
		for _, v := range sp.vals {
			n := fmt.Sprintf("%s=%d", sp.dim, v)
			known[n] = true
			all = append(all, n)
		}
	}
	out := map[string]bool{}
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		d, v, _ := strings.Cut(f, "=")
		if full, ok := dimAliases[d]; ok {
			d = full
		}
		n := d + "=" + v
		if !known[n] {
			return nil, fmt.Errorf("no scaling point %q (the points: %s)", f, strings.Join(all, ", "))
		}
		out[n] = true
	}
	return out, nil
}

// scaleConfig is the scenario of one point: base with the point's
// dimension changed.
func scaleConfig(base *scenario, dim string, v int64) scenario {
	sc := *base
	sc.KeepPcapMiB = 0
	sc.MemCheckMiB = flags.scaleMemCheck
	switch dim {
	case "guest_ram_mib":
		sc.RAMMiB = int(v)
	case "disk_data_mib":
		sc.Fill = units.ByteSize(v << 20)
		sc.Disk = max(sc.Disk, units.ByteSize(2*v<<20))
	case "echo_conns":
		sc.Conns = int(v)
		sc.EchoEvery = max(10*time.Millisecond, time.Duration(v)*time.Millisecond)
	}
	return sc
}

// configKey names a point's configuration (vms VMs moved at once): two
// points with the same key are one run.
func configKey(sc *scenario, vms int64) string {
	return fmt.Sprintf("ram %d, data %d, conns %d every %s, vms %d", sc.RAMMiB, sc.Fill, sc.Conns, sc.echoEvery(), vms)
}

// scaling runs the points (all, or -scale-only's, less -scale-skip's)
// once each and writes scale.json and scale.md into the scaling
// directory (-scale-dir, or -out/<date>-scaling). When that directory
// holds a scale.json already, the points this run measured replace
// theirs and the others are kept (mergeScale); its base must be this
// run's.
func scaling(base *scenario) error {
	t0 := time.Now()
	dir := flags.scaleDir
	if dir == "" {
		dir = filepath.Join(flags.out, t0.UTC().Format("2006-01-02")+"-scaling")
	}
	skip, err := parsePointList(flags.scaleSkip)
	if err != nil {
		return fmt.Errorf("-scale-skip: %w", err)
	}
	only, err := parsePointList(flags.scaleOnly)
	if err != nil {
		return fmt.Errorf("-scale-only: %w", err)
	}
	prev, err := readScaleFile(filepath.Join(dir, "scale.json"))
	if err != nil {
		return err
	}
	if prev != nil {
		if diff := baseDiff(prev.Base, base.describe()); len(diff) > 0 {
			return fmt.Errorf("%s: its base differs from this run's in %s: run with its flags (%s) or into another -scale-dir",
				dir, strings.Join(diff, ", "), prev.Command)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	date, rev := t0.UTC().Format(time.RFC3339), commit()
	var pts []ScalePoint
	keys := map[string]string{} // point name -> configuration
	ran := map[string]ScalePoint{}
	var measured []string
	for _, sp := range scalePoints {
		for _, v := range sp.vals {
			sc := scaleConfig(base, sp.dim, v)
			p := ScalePoint{Dimension: sp.dim, Value: v, EchoEvery: float64(sc.echoEvery()) / float64(time.Millisecond), MemCheckMiB: sc.MemCheckMiB}
			vms := int64(1)
			if sp.dim == "vms" {
				vms = v
			}
			name, key := p.Name(), configKey(&sc, vms)
			keys[name] = key
			switch {
			case skip[name]:
				p.Note = "not run (-scale-skip)"
			case len(only) > 0 && !only[name]:
				p.Note = "not run (not in -scale-only)"
			case ran[key].Dimension != "":
				p = sameAs(p, ran[key])
			default:
				fmt.Fprintf(os.Stderr, "== scaling %s (%s since start)\n", name, time.Since(t0).Round(time.Second))
				var r RunResult
				var err error
				if vms > 1 {
					r, err = runTwoVMs(context.Background(), &sc, log)
				} else {
					r, err = runOne(context.Background(), &sc, modeEBPF, 1, dir, log)
				}
				p.Metrics, p.Source, p.Date, p.Commit, p.EchoSpread, p.EchoUp = r.Metrics, r.Source, date, rev, true, r.EchoUp
				if err != nil {
					p.Err = err.Error()
				}
				fmt.Fprintf(os.Stderr, "   pause %.0f ms, disruption %.0f ms, longest echo gap %.0f ms, move %.1f s %s\n", r.Metrics["vm_pause_ms"],
					r.Metrics["disruption_total_ms"], r.Metrics["echo_gap_longest_ms"], r.Metrics["total_move_ms"]/1000, p.Err)
				if vms > 1 {
					fmt.Fprintf(os.Stderr, "   vm2: pause %.0f ms, move %.1f s, longest echo gap %.0f ms, pings lost %.0f; guests: %s\n", r.Metrics["vm2_vm_pause_ms"],
						r.Metrics["vm2_total_move_ms"]/1000, r.Metrics["vm2_echo_gap_longest_ms"], r.Metrics["vm2_ping_lost"], r.Guest)
				}
				if p.Source != nil {
					fmt.Fprintf(os.Stderr, "   source after the failure: %s\n", p.Source.Summary())
				}
				ran[key] = p
				measured = append(measured, name)
			}
			pts = append(pts, p)
		}
	}
	// A point not run whose configuration this run measured under
	// another name is that run (disk_data_mib=256 is guest_ram_mib=128).
	for i, p := range pts {
		if r, ok := ran[keys[p.Name()]]; ok && !p.measured() {
			pts[i] = sameAs(p, r)
		}
	}
	now := &ScaleFile{Date: date, Commit: rev, Host: host(), Base: base.describe(), Took: time.Since(t0).Round(time.Second).String(),
		Command: scaleCommand(), Points: pts}
	f := mergeScale(prev, now, measured)
	j, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "scale.json"), append(j, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "scaling results in %s\n", dir)
	return os.WriteFile(filepath.Join(dir, "scale.md"), []byte(f.Markdown()), 0o644)
}

// sameAs is point p as the run of r (the same configuration).
func sameAs(p, r ScalePoint) ScalePoint {
	p.Metrics, p.Err, p.Source, p.Date, p.Commit, p.EchoSpread, p.EchoUp = r.Metrics, r.Err, r.Source, r.Date, r.Commit, r.EchoSpread, r.EchoUp
	p.Note = fmt.Sprintf("the run of %s (the same configuration)", r.Name())
	return p
}

// readScaleFile reads a scaling directory's scale.json; nil if there is
// none. Points of a file written before points had a date and commit
// get the file's.
func readScaleFile(path string) (*ScaleFile, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var f ScaleFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var skipped []string
	for i, p := range f.Points {
		if p.measured() && p.Date == "" {
			f.Points[i].Date, f.Points[i].Commit = f.Date, f.Commit
		}
		if p.Note == "not run (-scale-skip)" {
			skipped = append(skipped, p.Name())
		}
	}
	if f.Command == "" {
		// Written before the file kept its command: rebuilt from its base.
		f.Command = fmt.Sprintf("go run ./bench/disruption -scale -disk %dMiB -fill %dMiB", f.Base.DiskMiB, f.Base.DiskDataMiB)
		if len(skipped) > 0 {
			f.Command += " -scale-skip " + strings.Join(skipped, ",")
		}
	}
	return &f, nil
}

// mergeScale merges run now (every point, measured or not) into prev, a
// scaling directory's file (nil: there was none, now is the file). A
// point now measured replaces prev's; a point now not measured (skipped,
// not selected) keeps prev's if prev has it; prev's points that now does
// not know (another version's) stay, after now's. The file keeps prev's
// date, commit, host and command; now is appended to its updates with
// the points it measured.
func mergeScale(prev, now *ScaleFile, measured []string) *ScaleFile {
	if prev == nil {
		return now
	}
	f := *prev
	f.NotMeasured = now.NotMeasured
	old := map[string]ScalePoint{}
	for _, p := range prev.Points {
		old[p.Name()] = p
	}
	f.Points = nil
	seen := map[string]bool{}
	for _, p := range now.Points {
		seen[p.Name()] = true
		if o, ok := old[p.Name()]; ok && !p.measured() {
			p = o
		}
		f.Points = append(f.Points, p)
	}
	for _, p := range prev.Points {
		if !seen[p.Name()] {
			f.Points = append(f.Points, p)
		}
	}
	f.Updates = append(slices.Clone(prev.Updates), ScaleUpdate{Date: now.Date, Commit: now.Commit, Host: now.Host, Took: now.Took,
		Command: now.Command, Points: measured})
	return &f
}

// baseDiff names the base's fields (JSON keys) in which a and b differ,
// leaving out those that do not change what a scaling point measures
// (the scenario's name, repeats, the spec file's path, descriptions, the
// control mode's window).
func baseDiff(a, b Scenario) []string {
	ignore := map[string]bool{"name": true, "repeats": true, "spec_file": true, "daemons": true, "freeze_and_copy_client": true,
		"control_window_ms": true}
	var ma, mb map[string]any
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	json.Unmarshal(ja, &ma)
	json.Unmarshal(jb, &mb)
	var diff []string
	for k, va := range ma {
		if !ignore[k] && fmt.Sprint(va) != fmt.Sprint(mb[k]) {
			diff = append(diff, fmt.Sprintf("%s (%v there, %v here)", k, va, mb[k]))
		}
	}
	sort.Strings(diff)
	return diff
}

// scaleCommand is this run's command line: the flags as given, less
// where results go.
func scaleCommand() string {
	args := []string{"go run ./bench/disruption"}
	flag.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "out", "pcap-dir", "scale-dir", "lab":
		case "scale":
			args = append(args, "-scale")
		default:
			args = append(args, "-"+f.Name+" "+f.Value.String())
		}
	})
	return strings.Join(args, " ")
}

// Markdown is scale.md: the base, the points' table, and which points
// were measured later, when, at which commit.
func (f *ScaleFile) Markdown() string {
	var b strings.Builder
	bs := f.Base
	fmt.Fprintf(&b, "# vmhop scaling, %s\n\nvmhop-ebpf (through the two vmhopd), once per point; the base: guest %d MiB RAM, %d MiB of data on a %d MiB disk, "+
		"%d echo connections at 100 Hz, site links %.0f Mbit/s, budget %.0f Mbit/s, disk stream %s; one dimension changed at a time. "+
		"Commit %s; host %s; took %s.\n\n", f.Date, bs.GuestRAMMiB, bs.DiskDataMiB, bs.DiskMiB, bs.EchoConns,
		bs.SiteLinkBitS/1e6, bs.BudgetBitS/1e6, diskStream(bs), f.Commit, f.Host, f.Took)
	for _, u := range f.Updates {
		fmt.Fprintf(&b, "Rerun into this file on %s: %s (commit %s; host %s; took %s; `%s`).\n\n", u.Date, strings.Join(u.Points, ", "),
			u.Commit, u.Host, u.Took, u.Command)
	}
	b.WriteString("| dimension | value | echo every | vm_pause_ms | disruption_total_ms | echo_gap_longest_ms | echo_reconnects | ping_lost | total_move_ms | migration_wire_bytes | error or note |\n" +
		"| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	var spread, lockstep []string
	for _, p := range f.Points {
		note := p.Note
		if p.measured() && p.Commit != "" && p.Commit != f.Commit {
			note = strings.TrimPrefix(note+"; ", "; ") + fmt.Sprintf("measured %s at commit %s", p.Date, p.Commit)
		}
		if p.measured() && p.MemCheckMiB > 0 {
			note = strings.TrimPrefix(note+"; ", "; ") + fmt.Sprintf("the guest's RAM verifier on %d MiB, not 32", p.MemCheckMiB)
		}
		if p.Dimension == "echo_conns" && p.EchoUp > 0 && int64(p.EchoUp) < p.Value {
			note = strings.TrimPrefix(note+"; ", "; ") + fmt.Sprintf("only %d of the %d echo connections up when the move started", p.EchoUp, p.Value)
		}
		if p.Source != nil {
			note = strings.TrimPrefix(note+"; ", "; ") + "the source after the failure: " + p.Source.Summary()
		}
		if p.Metrics == nil {
			fmt.Fprintf(&b, "| %s | %d | %.0f ms | | | | | | | | %s |\n", p.Dimension, p.Value, p.EchoEvery, cell(joinNote(p.Err, note)))
			continue
		}
		if p.Note == "" {
			if p.EchoSpread {
				spread = append(spread, p.Name())
			} else {
				lockstep = append(lockstep, p.Name())
			}
		}
		fmt.Fprintf(&b, "| %s | %d | %.0f ms | %s | %s | %s | %.0f | %.0f | %s | %s | %s |\n", p.Dimension, p.Value, p.EchoEvery,
			fmtVal("vm_pause_ms", p.Metrics["vm_pause_ms"]), fmtVal("disruption_total_ms", p.Metrics["disruption_total_ms"]),
			fmtVal("echo_gap_longest_ms", p.Metrics["echo_gap_longest_ms"]), p.Metrics["echo_reconnects"], p.Metrics["ping_lost"],
			fmtVal("total_move_ms", p.Metrics["total_move_ms"]), fmtVal("migration_wire_bytes", p.Metrics["migration_wire_bytes"]), cell(joinNote(p.Err, note)))
	}
	b.WriteString("\n`disruption_total_ms`: worst echo connection, gaps over 3 intervals less the interval (30 ms at 100 Hz, 300 ms at 10 Hz, 3 s at 1 Hz).\n")
	b.WriteString("\nEcho connections: n of them at the same total rate (1000 requests/s from 10 on), each giving up after 2 s without an answer " +
		"or 3 of its intervals if longer (3 s at 1 Hz: a client asking once a second does not hang up on one late answer), then reconnecting by name. " +
		"Independent clients do not send in step: connection i opens and sends at i/n of the interval, the connections opening at 100 a second at most " +
		"(1000 over 10 s), and the move starts once every one has had an answer (`labrun.Load`). ")
	if len(lockstep) == 0 {
		b.WriteString("Every point was measured so.\n")
	} else {
		fmt.Fprintf(&b, "Measured so: %s. Measured before, every connection in step (n segments in one burst per interval; "+
			"patience 2 s, as now at 100 and 10 Hz): %s.\n", orNone(spread), strings.Join(lockstep, ", "))
	}
	for _, p := range f.Points {
		if p.Dimension == "vms" && p.Metrics != nil {
			b.WriteString(vmsTable(p))
		}
	}
	if f.NotMeasured != "" {
		b.WriteString("\nNot measured: " + f.NotMeasured + "\n")
	}
	fmt.Fprintf(&b, "\nRerun: `sudo make bench BENCH_FLAGS='%s'` (or `%s`); `-scale-only DIMENSION=VALUE,...` and `-scale-dir` rerun chosen points into this directory, keeping the others.\n",
		strings.TrimPrefix(f.Command, "go run ./bench/disruption "), f.Command)
	return b.String()
}

func joinNote(err, note string) string {
	switch {
	case err == "":
		return note
	case note == "":
		return err
	}
	return err + "; " + note
}

// cell is s fit for one table cell: one line, no column breaks.
func cell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "\n", "; "), "|", "/")
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
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
