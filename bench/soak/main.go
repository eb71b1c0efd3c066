// Command soak runs many lab migrations back to back, each under the main
// job's client load (labrun.Load) with the guest's RAM and disk verifiers
// on, and says whether every one was correct: exit 0, the same guest boot
// after the move, no lost memory update, no lost disk record. It records
// per run the QEMU-reported pause, the switch gap (the longest gap any
// echo connection saw around the switchover, from the packet capture) and
// the load's view. Each run gets a fresh lab and guest. Needs root.
//
// Writes RESULT.json (every run's numbers) and RESULT.txt (a table).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
)

var flags struct {
	runs         int
	spec, out    string
	exactRAM     bool
	downtime     time.Duration
	autoConverge string
}

func main() {
	lab.RunChild()
	flag.IntVar(&flags.runs, "runs", 20, "migrations to run")
	flag.StringVar(&flags.spec, "spec", "configs/lab-migration.yaml", "migration spec (limits, DNS, health check)")
	flag.StringVar(&flags.out, "out", "", "write OUT.json and OUT.txt (e.g. bench/results/soak)")
	flag.BoolVar(&flags.exactRAM, "exact-ram", false, "guests without the 8 KiB RAM pad (reproduces QEMU 7.2's TCG bug)")
	flag.DurationVar(&flags.downtime, "downtime", 0, "override limits.downtime")
	flag.StringVar(&flags.autoConverge, "auto-converge", "", "override limits.auto_converge (true or false)")
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
}

// Run is one migration's record.
type Run struct {
	N          int     `json:"n"`
	Exit       int     `json:"exit"`
	Err        string  `json:"error,omitempty"`
	TotalMS    int64   `json:"total_ms"`
	PauseMS    float64 `json:"pause_ms"` // QEMU-reported downtime
	Passes     uint64  `json:"memory_passes"`
	SwitchGap  int64   `json:"switch_gap_ms"` // longest echo gap around the switchover
	WorstMS    int64   `json:"worst_connection_disruption_ms"`
	Unanswered int     `json:"echo_unanswered"`
	Reconnects int     `json:"echo_reconnects"`
	HTTPFailed int     `json:"http_failed"`
	HTTPTotal  int     `json:"http_attempts"`
	PingLost   int     `json:"ping_lost"`
	SameBoot   bool    `json:"same_boot"`
	MemCycles  uint64  `json:"mem_checks_after"`
	MemLost    uint64  `json:"mem_lost_pages"`
	MemCorrupt uint64  `json:"mem_corrupt_pages"`
	DiskOK     bool    `json:"disk_records_ok"`
	DiskAcked  uint64  `json:"disk_records"`
	Guest      string  `json:"guest_problem,omitempty"`
}

// Result is the soak.
type Result struct {
	Started  string `json:"started"`
	Host     string `json:"host"`
	Spec     string `json:"spec"`
	ExactRAM bool   `json:"exact_ram"`
	Downtime string `json:"downtime"`
	AutoConv bool   `json:"auto_converge"`
	Runs     []Run  `json:"runs"`
	Correct  int    `json:"correct"` // exit 0, same boot, nothing lost
}

func run() error {
	spec, err := config.LoadMigration(flags.spec)
	if err != nil {
		return err
	}
	if flags.downtime > 0 {
		spec.Limits.Downtime = flags.downtime
	}
	switch flags.autoConverge {
	case "":
	case "true", "false":
		spec.Limits.AutoConverge = flags.autoConverge == "true"
	default:
		return fmt.Errorf("-auto-converge: %q: want true or false", flags.autoConverge)
	}
	res := Result{Started: time.Now().UTC().Format(time.RFC3339), Host: fmt.Sprintf("%d cores", runtime.NumCPU()),
		Spec: flags.spec, ExactRAM: flags.exactRAM, Downtime: spec.Limits.Downtime.String(), AutoConv: spec.Limits.AutoConverge}
	ctx := context.Background()
	for i := 1; i <= flags.runs; i++ {
		r, err := once(ctx, i, spec)
		if err != nil {
			return fmt.Errorf("run %d: %w", i, err)
		}
		res.Runs = append(res.Runs, r)
		if r.Exit == 0 && r.SameBoot && r.MemLost == 0 && r.MemCorrupt == 0 && r.DiskOK {
			res.Correct++
		}
		fmt.Fprintf(os.Stderr, "soak: run %d: exit %d, pause %.0f ms, switch gap %d ms, mem lost %d, guest %q\n",
			i, r.Exit, r.PauseMS, r.SwitchGap, r.MemLost, r.Guest)
	}
	var txt strings.Builder
	table(&txt, res)
	fmt.Print(txt.String())
	if flags.out != "" {
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(flags.out+".json", append(b, '\n'), 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(flags.out+".txt", []byte(txt.String()), 0o644); err != nil {
			return err
		}
	}
	if res.Correct != len(res.Runs) {
		return fmt.Errorf("%d of %d migrations were not correct", len(res.Runs)-res.Correct, len(res.Runs))
	}
	return nil
}

// once runs one migration in a fresh lab; errors are the lab's (the
// migration's own failures are recorded in the Run).
func once(ctx context.Context, n int, spec *config.Migration) (Run, error) {
	name := fmt.Sprintf("soak%d", n)
	l, err := lab.Up(ctx, lab.Config{Name: name})
	if err != nil {
		return Run{}, err
	}
	defer l.Down()
	vm, err := l.StartVM(ctx, lab.VMConfig{ExactRAM: flags.exactRAM})
	if err != nil {
		return Run{}, err
	}
	if err := l.WaitGuest(ctx, vm.IP, 120*time.Second); err != nil {
		return Run{}, err
	}
	s := *spec
	s.DNS.TSIGKeyFile = l.KeyFile()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	out, merr := labrun.Migrate(ctx, l, &s, log)
	r := Run{N: n, Exit: out.Exit, Err: out.Err, TotalMS: out.Report.Total.Milliseconds(),
		PauseMS: float64(out.Report.Pause.Microseconds()) / 1000, Passes: out.Report.Runtime.Iterations,
		SwitchGap: out.SwitchGap().Milliseconds(),
		SameBoot:  out.Guest.SameBoot, MemCycles: out.Guest.MemCycles, MemLost: out.Guest.MemLost, MemCorrupt: out.Guest.MemCorrupt,
		DiskOK: out.Guest.Disk.OK() && out.Guest.Answered, DiskAcked: out.Guest.Disk.Acked, Guest: out.Guest.Problem,
		HTTPFailed: out.Client.HTTP.Failed, HTTPTotal: out.Client.HTTP.Attempts, PingLost: out.Client.Ping.Lost}
	_, worst := out.Worst()
	r.WorstMS = worst.Disruption.Total.Milliseconds()
	for _, e := range out.Client.Echo {
		r.Unanswered += e.Unanswered
		r.Reconnects += e.Reconnects
	}
	if merr != nil && r.Err == "" {
		r.Err = merr.Error()
	}
	return r, nil
}

func table(w io.Writer, res Result) {
	fmt.Fprintf(w, "vmhop soak: %d lab migrations under the main job's load, %s (%s)\n", len(res.Runs), res.Started, res.Host)
	fmt.Fprintf(w, "spec %s; downtime limit %s, auto-converge %v; guest RAM %s\n", res.Spec, res.Downtime, res.AutoConv,
		map[bool]string{true: "exactly 128 MiB (no TCG workaround)", false: "128 MiB + 8 KiB (TCG workaround)"}[res.ExactRAM])
	fmt.Fprintf(w, "load: 4 echo connections at 100 Hz, new HTTP connection by name every 50 ms, ICMP every 10 ms\n\n")
	fmt.Fprintf(w, "%3s %4s %8s %8s %6s %9s %8s %6s %8s %6s %6s %9s %6s\n", "run", "exit", "total_s", "pause_ms", "passes",
		"switch_ms", "worst_ms", "unansw", "http_bad", "p_lost", "boot", "mem_lost", "disk")
	var pauses, gaps []float64
	for _, r := range res.Runs {
		fmt.Fprintf(w, "%3d %4d %8.1f %8.0f %6d %9d %8d %6d %8s %6d %6v %9d %6v\n", r.N, r.Exit, float64(r.TotalMS)/1000, r.PauseMS,
			r.Passes, r.SwitchGap, r.WorstMS, r.Unanswered, fmt.Sprintf("%d/%d", r.HTTPFailed, r.HTTPTotal), r.PingLost,
			r.SameBoot, r.MemLost+r.MemCorrupt, r.DiskOK)
		if r.Err != "" || r.Guest != "" {
			fmt.Fprintf(w, "    %s %s\n", r.Err, r.Guest)
		}
		pauses = append(pauses, r.PauseMS)
		gaps = append(gaps, float64(r.SwitchGap))
	}
	fmt.Fprintf(w, "\ncorrect (exit 0, same boot, 0 lost memory pages, every disk record): %d of %d\n", res.Correct, len(res.Runs))
	fmt.Fprintf(w, "pause ms min/median/max: %s; switch gap ms: %s\n", mmm(pauses), mmm(gaps))
}

func mmm(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return fmt.Sprintf("%.0f/%.0f/%.0f", s[0], s[len(s)/2], s[len(s)-1])
}
