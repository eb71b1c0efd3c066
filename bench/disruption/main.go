// Command disruption is vmhop's benchmark: it moves the lab's guest from
// site A to site B in several modes, each in every run, under the same
// scenario and client load, repeats each, and decomposes what the client
// saw from a packet capture at the client:
//
//   - freeze-and-copy: stop the VM, copy its disk's data over the WAN, boot
//     it at site B on the new address, flip DNS;
//
//   - live-dns-only: live migration and the DNS flip, without the redirect
//     (the spec's network.redirect: false);
//
//   - vmhop-ebpf: live migration, the eBPF redirect, the DNS flip;
//
//   - vmhop-userspace: the same with the userspace fallback redirect
//     (both vmhopd with datapath userspace: a WireGuard tunnel, no BPF).
//
//   - control: no move: the same lab, load and capture for a fixed window
//     (-control-window), the guest's own disruption floor (not in the
//     freeze-and-copy over vmhop ratios).
//
// The live modes go through the product: a vmhopd per site, the spec
// handed to site A's (labrun.MigrateWith). A mode may carry levers:
// BASE[@BUDGET][+pacing=off|budget|yield][+cc=NAME] (see modeSpec).
//
// The load (labrun.Load): persistent echo connections at 100 Hz, a new
// HTTP connection by DNS name every 50 ms, ICMP every 10 ms, one bulk
// download in flight across the move; every client gives up after 2 s of
// silence (an echo connection after 3 of its intervals if that is longer)
// and reconnects by name; the echo connections open and send spread over
// their interval, not in step. Outputs under -out/<date>-<scenario>/:
// results.json (every metric, units in the names), results.md,
// pcap-summary.txt, the small pcaps, timeline-<mode>.png and bars*.png.
// Needs root (the lab).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator/storage"
)

// captureFilter is what the client's capture keeps: the echo connections,
// HTTP (new connections and the bulk download) and ICMP.
const captureFilter = "tcp port 7 or tcp port 80 or icmp"

var serverPorts = map[uint16]bool{labrun.EchoPort: true, 80: true}

var flags struct {
	disk, fill, rate, bulk, spec, out, name, modes, labName string
	pcapDir, analyze, scaleSkip, scaleOnly, scaleDir        string
	repeats, conns, ram, scaleMemCheck                      int
	giveUp, controlWindow                                   time.Duration
	keepPcap                                                int64
	scale                                                   bool
}

// scenario is the parsed flags: what every mode moves, under which load.
type scenario struct {
	Name       string
	Disk, Fill units.ByteSize
	Rate       units.Bitrate
	RAMMiB     int
	Conns      int
	EchoEvery  time.Duration // each echo connection's interval; 0 is 10 ms
	BulkRate   int64
	GiveUp     time.Duration
	Repeats    int
	// ControlWindow is how long the control mode runs the load with no move.
	ControlWindow time.Duration
	Links         map[string]lab.Profile
	Spec          *config.Migration
	SpecFile      string
	Modes         []string
	KeepPcapMiB   int64
	// MemCheckMiB is the guest's RAM verifier's working set; 0: the
	// agent's default (32 MiB). Only -scale-memcheck-mib sets it.
	MemCheckMiB int
}

func main() {
	lab.RunChild()
	flag.StringVar(&flags.name, "scenario", "standard", "scenario name (results go to -out/<date>-<scenario>)")
	flag.StringVar(&flags.disk, "disk", "2GiB", "guest disk size")
	flag.StringVar(&flags.fill, "fill", "1GiB", "random data written to the disk before boot (what freeze-and-copy copies)")
	flag.StringVar(&flags.rate, "rate", "100mbit", "rate of each site's WAN link")
	flag.IntVar(&flags.ram, "ram", 128, "guest RAM, MiB")
	flag.IntVar(&flags.conns, "conns", 4, "persistent echo connections at 100 Hz")
	flag.StringVar(&flags.bulk, "bulk-rate", "8mbit", "pace of the bulk download (the guest sends at it); 0: unpaced")
	flag.DurationVar(&flags.giveUp, "give-up", 2*time.Second, "clients give up on a silent connection after this and reconnect by name")
	flag.IntVar(&flags.repeats, "repeats", 3, "runs per mode")
	flag.StringVar(&flags.modes, "modes", strings.Join([]string{modeControl, modeFreeze, modeDNSOnly, modeEBPF, modeUserspace}, ","), "modes, comma-separated")
	flag.DurationVar(&flags.controlWindow, "control-window", 100*time.Second, "how long the control mode runs the load without a move (about a vmhop-ebpf move)")
	flag.StringVar(&flags.spec, "spec", "configs/lab-migration.yaml", "migration spec (limits, DNS)")
	flag.StringVar(&flags.out, "out", "bench/results", "results directory (a <date>-<scenario> directory is made in it)")
	flag.StringVar(&flags.labName, "lab", "bench", "lab name")
	flag.Int64Var(&flags.keepPcap, "keep-pcap-mib", 4, "keep a run's pcap beside the results when it is at most this many MiB")
	flag.StringVar(&flags.pcapDir, "pcap-dir", "", "also keep every run's pcap in this directory (outside the repository: live runs' are tens of MiB)")
	flag.StringVar(&flags.analyze, "analyze", "", "only analyze this pcap (a client capture) and print its summary and each connection's deliveries")
	flag.StringVar(&flags.scaleSkip, "scale-skip", "", "scaling points not to run, comma-separated DIMENSION=VALUE (e.g. disk_data_mib=1024, measured by the standard run)")
	flag.StringVar(&flags.scaleOnly, "scale-only", "", "run only these scaling points, comma-separated DIMENSION=VALUE (ram, data, conns name the dimensions too: conns=1000)")
	flag.StringVar(&flags.scaleDir, "scale-dir", "", "the scaling results directory (default -out/<date>-scaling); a scale.json there is updated: the points run replace theirs, the others are kept")
	flag.IntVar(&flags.scaleMemCheck, "scale-memcheck-mib", 0, "the guest's RAM verifier's working set, MiB, for the scaling points run (0: the guest's 32); recorded per point")
	flag.BoolVar(&flags.scale, "scale", false, "scaling runs instead (vmhop-ebpf once per point: RAM, written disk, client connections, two VMs at once)")
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "disruption:", err)
		os.Exit(1)
	}
}

func parse() (*scenario, error) {
	sc := &scenario{Name: flags.name, RAMMiB: flags.ram, Conns: flags.conns, GiveUp: flags.giveUp, Repeats: flags.repeats,
		SpecFile: flags.spec, KeepPcapMiB: flags.keepPcap, ControlWindow: flags.controlWindow}
	var err error
	if sc.Disk, err = units.ParseByteSize(flags.disk); err != nil {
		return nil, fmt.Errorf("-disk: %w", err)
	}
	if sc.Fill, err = units.ParseByteSize(flags.fill); err != nil {
		return nil, fmt.Errorf("-fill: %w", err)
	}
	if sc.Rate, err = units.ParseBitrate(flags.rate); err != nil {
		return nil, fmt.Errorf("-rate: %w", err)
	}
	if flags.bulk == "0" {
		sc.BulkRate = -1
	} else {
		br, err := units.ParseBitrate(flags.bulk)
		if err != nil {
			return nil, fmt.Errorf("-bulk-rate: %w", err)
		}
		sc.BulkRate = int64(br.BytesPerSecond())
	}
	if sc.ControlWindow <= 0 {
		return nil, fmt.Errorf("-control-window %s: want a positive duration", sc.ControlWindow)
	}
	if sc.Repeats < 1 {
		return nil, fmt.Errorf("-repeats %d: want at least 1", sc.Repeats)
	}
	for _, m := range strings.Split(flags.modes, ",") {
		if _, err := parseMode(m); err != nil {
			return nil, fmt.Errorf("-modes: %w", err)
		}
		sc.Modes = append(sc.Modes, m)
	}
	if sc.Spec, err = config.LoadMigration(flags.spec); err != nil {
		return nil, err
	}
	sc.Links = lab.DefaultLinks()
	for _, h := range []string{lab.SiteA, lab.SiteB} {
		p := sc.Links[h]
		p.Rate = sc.Rate
		sc.Links[h] = p
	}
	return sc, nil
}

// load is the client load every mode runs under.
func (sc *scenario) load(l *lab.Lab, addr netip.Addr, spec *config.Migration) *labrun.Load {
	return &labrun.Load{L: l, Addr: addr, Name: spec.DNS.Name, DNS: netip.MustParseAddrPort(spec.DNS.Server),
		Conns: sc.Conns, EchoEvery: sc.EchoEvery, GiveUp: sc.GiveUp, BulkRate: sc.BulkRate}
}

func (sc *scenario) echoEvery() time.Duration {
	if sc.EchoEvery > 0 {
		return sc.EchoEvery
	}
	return 10 * time.Millisecond
}

func (sc *scenario) shape() *labrun.Load {
	return &labrun.Load{Conns: sc.Conns, EchoEvery: sc.EchoEvery, GiveUp: sc.GiveUp, BulkRate: sc.BulkRate}
}

func (sc *scenario) describe() Scenario {
	a := sc.Links[lab.SiteA]
	return Scenario{Name: sc.Name, Repeats: sc.Repeats, GuestRAMMiB: sc.RAMMiB, DiskMiB: int64(sc.Disk) >> 20, DiskDataMiB: int64(sc.Fill) >> 20,
		SiteLinkBitS: float64(sc.Rate), SiteRTTMs: float64(4*a.Delay) / float64(time.Millisecond),
		BudgetBitS: float64(sc.Spec.Limits.Bandwidth.BytesPerSecond()) * 8, Pacing: sc.Spec.Limits.Pacing, Congestion: sc.Spec.Limits.Congestion,
		Daemons: "the live modes through two vmhopd processes (one per site, own config, mutual TLS), as `vmhop migrate` runs them", EchoConns: sc.Conns, EchoEveryMs: float64(sc.echoEvery()) / float64(time.Millisecond), HTTPEveryMs: 50, PingEveryMs: 10,
		BulkRateBytesS: sc.BulkRate, ClientGiveUpMs: float64(sc.GiveUp) / float64(time.Millisecond),
		DownTimeLimitMs: float64(sc.Spec.Limits.Downtime) / float64(time.Millisecond), DiskRecordsPerS: 20, VMsMovedAtOnce: 1,
		SpecFile: sc.SpecFile, DiskStorageMode: sc.Spec.Storage.Mode, CaptureFilter: captureFilter,
		FreezeReconnects: fmt.Sprintf("the same load; clients give up after %s of silence and reconnect by name", sc.GiveUp),
		ControlWindowMs:  float64(sc.ControlWindow) / float64(time.Millisecond)}
}

func run() error {
	if flags.analyze != "" {
		c, err := AnalyzeFile(flags.analyze, serverPorts, labrun.EchoPort)
		if err != nil {
			return err
		}
		fmt.Print(c.Summary(), c.Deliveries(labrun.EchoPort))
		return nil
	}
	sc, err := parse()
	if err != nil {
		return err
	}
	if os.Getenv("VMHOPD") == "" {
		// One vmhopd for every lab of the run (labrun would build one per lab).
		tmp, err := os.MkdirTemp("", "vmhop-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		bin := filepath.Join(tmp, "vmhopd")
		if out, err := exec.Command("go", "build", "-o", bin, "github.com/vmhop/vmhop/cmd/vmhopd").CombinedOutput(); err != nil {
			return fmt.Errorf("build vmhopd: %w: %s", err, out)
		}
		os.Setenv("VMHOPD", bin)
	}
	if flags.scale {
		return scaling(sc)
	}
	t0 := time.Now()
	dir := filepath.Join(flags.out, t0.UTC().Format("2006-01-02")+"-"+sc.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	res := &Results{Date: t0.UTC().Format(time.RFC3339), Commit: commit(), Host: host(), Scenario: sc.describe(), Metrics: metrics}
	byMode := map[string]*ModeResult{}
	for _, mi := range modeInfo {
		for _, m := range sc.Modes {
			ms, _ := parseMode(m)
			if ms.base != mi.name {
				continue
			}
			res.Modes = append(res.Modes, ModeResult{Mode: m, What: mi.what + ms.describe()})
		}
	}
	for i := range res.Modes {
		byMode[res.Modes[i].Mode] = &res.Modes[i]
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// Modes interleaved, repeat by repeat: the machine's load drifts, and
	// each mode sees the same drift.
	for rep := 1; rep <= sc.Repeats; rep++ {
		for i := range res.Modes {
			m := &res.Modes[i]
			fmt.Fprintf(os.Stderr, "== %s, run %d of %d (%s since start)\n", m.Mode, rep, sc.Repeats, time.Since(t0).Round(time.Second))
			r, err := runOne(context.Background(), sc, m.Mode, rep, dir, log)
			if err != nil {
				r.Err = err.Error()
				fmt.Fprintf(os.Stderr, "   FAILED: %v\n", err)
			}
			if _, moved := r.Metrics["total_move_ms"]; !moved && err == nil {
				fmt.Fprintf(os.Stderr, "   no move: disruption %.0f ms (outage %.0f ms), longest echo gap %.0f ms\n",
					r.Metrics["disruption_total_ms"], r.Metrics["disruption_outage_ms"], r.Metrics["echo_gap_longest_ms"])
			} else {
				fmt.Fprintf(os.Stderr, "   pause %.0f ms, disruption %.0f ms, longest echo gap %.0f ms, move %.1f s\n", r.Metrics["vm_pause_ms"],
					r.Metrics["disruption_total_ms"], r.Metrics["echo_gap_longest_ms"], r.Metrics["total_move_ms"]/1000)
			}
			m.Runs = append(m.Runs, r)
		}
	}
	for i := range res.Modes {
		res.Modes[i].Stats = Aggregate(res.Modes[i].Runs)
	}
	if fc, vm := byMode[modeFreeze], byMode[modeEBPF]; fc != nil && vm != nil {
		res.RatioFreezeOverVmhop = Ratios(fc.Stats, vm.Stats)
	}
	res.Took = time.Since(t0).Round(time.Second).String()
	res.Notes = append(res.Notes, "Rerun: `"+rerun()+"` (root, from the repository).")
	if err := res.Write(dir); err != nil {
		return err
	}
	if err := plots(dir, res); err != nil {
		return err
	}
	fmt.Print(res.Markdown())
	fmt.Fprintf(os.Stderr, "results in %s\n", dir)
	return nil
}

// barMetrics are the decomposed metrics the bar charts show.
var barMetrics = []string{"vm_pause_ms", "disruption_total_ms", "echo_gap_longest_ms", "echo_gap_switchover_ms", "bulk_gap_longest_ms", "tcp_rto_retransmits",
	"http_fail_window_ms", "new_addr_after_stop_ms", "ping_lost", "total_move_ms"}

// plots draws each mode's first good run's timeline and the bar charts
// (all modes; the live modes alone, on their own scale).
func plots(dir string, res *Results) error {
	var live []ModeResult
	for _, m := range res.Modes {
		if m.Mode != modeFreeze {
			live = append(live, m)
		}
		for _, r := range m.Runs {
			if r.Err != "" || len(r.samples) == 0 {
				continue
			}
			title := fmt.Sprintf("%s, run %d: reply latency per probe, phases shaded", m.Mode, r.Repeat)
			if err := Timeline(filepath.Join(dir, "timeline-"+m.Mode+".png"), title, r.start, r.samples, r.Phases); err != nil {
				return err
			}
			break
		}
	}
	if err := Bars(filepath.Join(dir, "bars.png"), res.Modes, barMetrics); err != nil {
		return err
	}
	return Bars(filepath.Join(dir, "bars-live.png"), live, barMetrics)
}

// runOne makes one move in mode in a lab of its own.
func runOne(ctx context.Context, sc *scenario, mode string, rep int, dir string, log *slog.Logger) (RunResult, error) {
	r := RunResult{Repeat: rep, Metrics: map[string]float64{}}
	var redirect labrun.Redirect
	ms, err := parseMode(mode)
	if err != nil {
		return r, err
	}
	spec := *sc.Spec
	ms.apply(&spec)
	base := ms.base
	switch base {
	case modeDNSOnly:
		redirect = labrun.RedirectNone
	case modeEBPF:
		redirect = labrun.RedirectEBPF
	case modeUserspace:
		redirect = labrun.RedirectUserspace
	}
	l, err := lab.Up(ctx, lab.Config{Name: flags.labName, Links: sc.Links})
	if err != nil {
		return r, err
	}
	defer l.Down()
	vm, err := l.StartVM(ctx, lab.VMConfig{MemMiB: sc.RAMMiB, DiskSize: sc.Disk, Prefill: sc.Fill, MemCheckMiB: sc.MemCheckMiB})
	if err != nil {
		return r, err
	}
	if err := l.WaitGuest(ctx, vm.IP, 180*time.Second); err != nil {
		return r, err
	}
	var d runData
	var pcap string
	var merr error
	switch base {
	case modeControl:
		d, pcap, merr = control(ctx, l, vm, &spec, sc)
		r.Guest = fmt.Sprintf("not moved: at site A for the %s window", sc.ControlWindow)
	case modeFreeze:
		d, pcap, merr = freezeAndCopy(ctx, l, vm, &spec, sc)
		r.Guest = "booted anew at site B (a new boot: its RAM is lost by design)"
	default:
		var out labrun.Outcome
		out, merr = labrun.MigrateWith(ctx, l, &spec, log, sc.shape(), labrun.Options{Redirect: redirect, Capture: captureFilter})
		d = live(out)
		pcap = out.Pcap
		r.Source, r.EchoUp = out.Source, out.EchoUp
		g := out.Guest
		r.Guest = fmt.Sprintf("same boot %v; RAM verifier %d lost, %d corrupt in %d checks; disk %s", g.SameBoot, g.MemLost, g.MemCorrupt, g.MemCycles, g.Disk)
		if g.Problem != "" {
			r.Guest += "; PROBLEM: " + g.Problem
		}
	}
	if pcap != "" {
		c, err := AnalyzeFile(pcap, serverPorts, labrun.EchoPort)
		if err != nil {
			merr = fmt.Errorf("%v; capture: %w", merr, err)
		} else {
			d.Capture = c
			r.PcapSummary = c.Summary()
			r.samples = c.Samples
		}
		if flags.pcapDir != "" {
			if err := os.MkdirAll(flags.pcapDir, 0o755); err == nil {
				copyFile(pcap, filepath.Join(flags.pcapDir, fmt.Sprintf("%s-%s-%d.pcap", sc.Name, mode, rep)))
			}
		}
		if st, err := os.Stat(pcap); err == nil && st.Size() <= sc.KeepPcapMiB<<20 {
			name := fmt.Sprintf("%s-%d.pcap", mode, rep)
			if copyFile(pcap, filepath.Join(dir, name)) == nil {
				r.Pcap = name
			}
		}
	}
	d.Bulk = bulkPorts(d.View)
	d.EchoEvery = sc.echoEvery()
	r.Metrics = compute(d)
	r.start = d.Start
	r.Start, r.Stopped, r.Resumed = d.Start, d.Stopped, d.Resumed
	for _, s := range d.Phases {
		r.Phases = append(r.Phases, PhaseMs{Name: s.Name, FromMs: msSince(d.Start, s.From), ToMs: msSince(d.Start, s.To)})
	}
	return r, merr
}

// modeSpec is a mode as -modes names it: BASE[@BUDGET][+pacing=off|budget|yield]
// [+cc=NAME]: a live mode with the migration's budget set to BUDGET
// (e.g. vmhop-ebpf@70mbit), the disk stream's kernel pacing
// (limits.pacing: off, budget, yield), its TCP congestion control (limits.congestion;
// "default" is the host's). Side by side, what makes the migration yield
// to the VM's own traffic.
type modeSpec struct {
	base   string
	budget units.Bitrate // 0: the spec's
	pacing string        // "": the spec's; else limits.pacing
	cc     string        // "": the spec's; "default": the host's
}

func parseMode(m string) (modeSpec, error) {
	parts := strings.Split(m, "+")
	head, levers := parts[0], parts[1:]
	base, b, hasBudget := strings.Cut(head, "@")
	ms := modeSpec{base: base}
	known := false
	for _, mi := range modeInfo {
		known = known || mi.name == base
	}
	if !known {
		return ms, fmt.Errorf("unknown mode %q", base)
	}
	if (base == modeFreeze || base == modeControl) && (hasBudget || len(levers) > 0) {
		return ms, fmt.Errorf("mode %q: %s has no budget or disk stream levers", m, base)
	}
	if hasBudget {
		budget, err := units.ParseBitrate(b)
		if err != nil || budget <= 0 {
			return ms, fmt.Errorf("mode %q: budget: %v", m, err)
		}
		ms.budget = budget
	}
	for _, l := range levers {
		k, v, _ := strings.Cut(l, "=")
		switch {
		case k == "pacing" && (v == storage.PacingOff || v == storage.PacingBudget || v == storage.PacingYield):
			ms.pacing = v
		case k == "cc" && v != "":
			ms.cc = v
		default:
			return ms, fmt.Errorf("mode %q: lever %q: want pacing=off|budget|yield or cc=NAME", m, l)
		}
	}
	return ms, nil
}

// apply changes spec as the mode says.
func (ms modeSpec) apply(spec *config.Migration) {
	if ms.budget > 0 {
		spec.Limits.Bandwidth = ms.budget
	}
	if ms.pacing != "" {
		spec.Limits.Pacing = ms.pacing
	}
	switch ms.cc {
	case "":
	case "default":
		spec.Limits.Congestion = ""
	default:
		spec.Limits.Congestion = ms.cc
	}
}

// describe is what the mode changes, for the modes' list ("" if nothing).
func (ms modeSpec) describe() string {
	var s string
	if ms.budget > 0 {
		s += fmt.Sprintf("; migration budget %s instead of the spec's", ms.budget)
	}
	if ms.pacing != "" {
		s += "; disk stream pacing " + ms.pacing
	}
	if ms.cc == "default" {
		s += "; disk stream congestion control: the host's default"
	} else if ms.cc != "" {
		s += "; disk stream congestion control " + ms.cc
	}
	return s
}

// live is a live migration's outcome as a run.
func live(out labrun.Outcome) runData {
	d := runData{Start: out.Start, Total: out.Report.Total, Pause: out.Report.Pause, Phases: out.Spans(), View: out.Client,
		MigrationWire: int64(out.Report.Runtime.Transferred) + out.Report.DiskWire}
	for _, s := range d.Phases {
		if s.Name == "memory" {
			d.Resumed = s.To
			d.Stopped = s.To.Add(-out.Report.Pause)
		}
	}
	return d
}

// rerun is the command that makes this run again: its flags as given
// (the output directory left to its default), with the defaults spelt out.
func rerun() string {
	args := []string{"go run ./bench/disruption"}
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) {
		set[f.Name] = true
		if f.Name != "out" && f.Name != "pcap-dir" {
			args = append(args, "-"+f.Name+" "+f.Value.String())
		}
	})
	for _, name := range []string{"repeats", "disk", "fill", "modes"} {
		if !set[name] {
			args = append(args, "-"+name+" "+flag.Lookup(name).Value.String())
		}
	}
	return strings.Join(args, " ")
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

func commit() string {
	b, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func host() string {
	var u unix.Utsname
	unix.Uname(&u)
	return fmt.Sprintf("%d cores, Linux %s", runtime.NumCPU(), unix.ByteSliceToString(u.Release[:]))
}
