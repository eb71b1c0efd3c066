package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/labrun"
)

// Results is one benchmark run: the scenario, every mode's runs and
// their statistics (results.json).
type Results struct {
	Date     string   `json:"date"`
	Commit   string   `json:"commit"`
	Host     string   `json:"host"`
	Scenario Scenario `json:"scenario"`
	// Metrics names and explains every metric (units in the names).
	Metrics []metric     `json:"metrics"`
	Modes   []ModeResult `json:"modes"`
	// RatioFreezeOverVmhop is freeze-and-copy's median over vmhop's (eBPF
	// redirect), metric by metric.
	RatioFreezeOverVmhop map[string]float64 `json:"ratio_freeze_over_vmhop_median"`
	Took                 string             `json:"took"`
	Notes                []string           `json:"notes,omitempty"`
}

// Scenario is what every mode moves, and under which load.
type Scenario struct {
	Name             string  `json:"name"`
	Repeats          int     `json:"repeats"`
	GuestRAMMiB      int     `json:"guest_ram_mib"`
	DiskMiB          int64   `json:"disk_mib"`
	DiskDataMiB      int64   `json:"disk_data_mib"`
	SiteLinkBitS     float64 `json:"site_link_bit_s"`
	SiteRTTMs        float64 `json:"site_to_site_rtt_ms"`
	BudgetBitS       float64 `json:"migration_budget_bit_s"`
	Pacing           string  `json:"pacing"`     // the spec's limits.pacing (a mode's +pacing= overrides it)
	Congestion       string  `json:"congestion"` // the spec's limits.congestion ("": the host's default)
	Daemons          string  `json:"daemons"`    // how the live modes ran
	EchoConns        int     `json:"echo_conns"`
	EchoEveryMs      float64 `json:"echo_every_ms"`
	HTTPEveryMs      float64 `json:"http_every_ms"`
	PingEveryMs      float64 `json:"ping_every_ms"`
	BulkRateBytesS   int64   `json:"bulk_rate_bytes_s"` // <0: unpaced
	ClientGiveUpMs   float64 `json:"client_give_up_ms"`
	DownTimeLimitMs  float64 `json:"downtime_limit_ms"`
	DiskRecordsPerS  float64 `json:"disk_records_per_s"`
	VMsMovedAtOnce   int     `json:"vms_moved_at_once"`
	SpecFile         string  `json:"spec_file"`
	DiskStorageMode  string  `json:"disk_storage_mode"`
	CaptureFilter    string  `json:"capture_filter"`
	FreezeReconnects string  `json:"freeze_and_copy_client"`
	ControlWindowMs  float64 `json:"control_window_ms"` // the control mode's window (no move)
}

// ModeResult is one way of moving the VM.
type ModeResult struct {
	Mode  string          `json:"mode"`
	What  string          `json:"what"`
	Runs  []RunResult     `json:"runs"`
	Stats map[string]Stat `json:"stats"`
}

// RunResult is one move.
type RunResult struct {
	Repeat      int                `json:"repeat"`
	Err         string             `json:"error,omitempty"`
	Metrics     map[string]float64 `json:"metrics"`
	Phases      []PhaseMs          `json:"phases"`
	Guest       string             `json:"guest"`
	PcapSummary string             `json:"pcap_summary"`
	Pcap        string             `json:"pcap,omitempty"` // kept beside the results when small
	// Source is the source VM after a failed live move: whether it
	// stayed safe (nil if the move did not fail).
	Source *labrun.SourceState `json:"source_after_failure,omitempty"`
	// EchoUp: echo connections that had an answer when the move started
	// (a live move: they open over time, labrun.Load.WaitEcho).
	EchoUp int `json:"echo_conns_up_at_start,omitempty"`
	// The move's start and the VM's pause on the host's wall clock (the
	// capture's clock): where the phases and the pause sit in a pcap
	// kept with -pcap-dir. Stopped is Resumed less QEMU's pause (live).
	Start   time.Time `json:"start,omitzero"`
	Stopped time.Time `json:"stopped,omitzero"`
	Resumed time.Time `json:"resumed,omitzero"`
	samples []Sample
	start   time.Time
}

// PhaseMs is a phase's place, in ms since the move started.
type PhaseMs struct {
	Name   string  `json:"name"`
	FromMs float64 `json:"from_ms"`
	ToMs   float64 `json:"to_ms"`
}

// modeOrder and their descriptions.
var modeInfo = []struct{ name, what string }{
	{modeControl, "control: no move; the same lab, load and capture for a fixed window with the guest at site A " +
		"(its reply gaps are the guest's own floor: a single TCG vCPU on a shared host; not in the ratios; " +
		"the round trips \"during the copy\" are the window's)"},
	{modeFreeze, "stop the VM, copy its disk's data over the WAN, boot it at site B on the new address, flip DNS " +
		"(run by the benchmark itself, no vmhopd: QMP stop and quit at site A, a sparse-aware TCP copy of the image's data extents " +
		"through the WAN, a new QEMU at site B, a TSIG-signed DNS flip)"},
	{modeDNSOnly, "live migration (memory and disk), DNS flip, no redirect: packets for the old address are lost " +
		"(through the two vmhopd daemons, datapath ebpf, the spec with network.redirect: false)"},
	{modeEBPF, "vmhop: live migration, eBPF redirect of the old address to site B, DNS flip " +
		"(through the two vmhopd daemons with datapath ebpf: `vmhop migrate` to site A's vmhopd)"},
	{modeUserspace, "vmhop with the packet-level userspace fallback redirect instead of eBPF " +
		"(through the two vmhopd daemons with datapath userspace: a WireGuard tunnel per migration, no BPF)"},
}

const (
	modeControl   = "control"
	modeFreeze    = "freeze-and-copy"
	modeDNSOnly   = "live-dns-only"
	modeEBPF      = "vmhop-ebpf"
	modeUserspace = "vmhop-userspace"
)

// fmtVal formats a metric's value for a table, by its unit.
func fmtVal(name string, v float64) string {
	switch {
	case strings.HasSuffix(name, "_ms") && v >= 10000:
		return fmt.Sprintf("%.1f s", v/1000)
	case strings.HasSuffix(name, "_ms"):
		return fmt.Sprintf("%.0f ms", v)
	case strings.HasSuffix(name, "_bytes"):
		return fmt.Sprintf("%.1f MiB", v/(1<<20))
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

// Markdown is the results as tables: median (min-max) per mode, and the
// ratio of freeze-and-copy's median over vmhop's.
func (r *Results) Markdown() string {
	var b strings.Builder
	s := r.Scenario
	fmt.Fprintf(&b, "# vmhop benchmark: %s, %s\n\n", s.Name, r.Date)
	fmt.Fprintf(&b, "Guest %d MiB RAM, disk %d MiB with %d MiB of data; site links %.0f Mbit/s, %.0f ms RTT between sites; "+
		"migration budget %.0f Mbit/s; disk stream %s. Load: %d echo connections at %.0f Hz, a new HTTP connection by DNS name every %.0f ms, "+
		"ICMP every %.0f ms, one bulk download (%s); clients give up after %.0f ms of silence and reconnect by name. "+
		"%d repeats per mode; median (min-max). Commit %s; host %s; took %s.\n\n",
		s.GuestRAMMiB, s.DiskMiB, s.DiskDataMiB, s.SiteLinkBitS/1e6, s.SiteRTTMs, s.BudgetBitS/1e6, diskStream(s), s.EchoConns, 1000/s.EchoEveryMs,
		s.HTTPEveryMs, s.PingEveryMs, bulkRate(s.BulkRateBytesS), s.ClientGiveUpMs, s.Repeats, r.Commit, r.Host, r.Took)
	for _, m := range r.Modes {
		if m.Mode == modeControl {
			fmt.Fprintf(&b, "`control` moves nothing: the same lab and load for %s, the guest's own floor (not in the ratio).\n\n",
				fmtVal("control_window_ms", s.ControlWindowMs))
		}
	}
	b.WriteString("| metric |")
	for _, m := range r.Modes {
		fmt.Fprintf(&b, " %s |", m.Mode)
	}
	b.WriteString(" freeze-and-copy / vmhop-ebpf |\n| --- |")
	for range r.Modes {
		b.WriteString(" --- |")
	}
	b.WriteString(" --- |\n")
	for _, mt := range metrics {
		fmt.Fprintf(&b, "| `%s` |", mt.Name)
		for _, m := range r.Modes {
			st, ok := m.Stats[mt.Name]
			switch {
			case !ok:
				b.WriteString(" - |")
			case st.Min == st.Max:
				fmt.Fprintf(&b, " %s |", fmtVal(mt.Name, st.Median))
			default:
				fmt.Fprintf(&b, " %s (%s-%s) |", fmtVal(mt.Name, st.Median), fmtVal(mt.Name, st.Min), fmtVal(mt.Name, st.Max))
			}
		}
		if x, ok := r.RatioFreezeOverVmhop[mt.Name]; ok && !math.IsInf(x, 0) {
			fmt.Fprintf(&b, " %s |\n", fmtRatio(x))
		} else {
			b.WriteString(" - |\n")
		}
	}
	b.WriteString("\nMetrics:\n\n")
	for _, mt := range metrics {
		fmt.Fprintf(&b, "- `%s`: %s\n", mt.Name, mt.What)
	}
	b.WriteString("\nModes:\n\n")
	for _, m := range r.Modes {
		fmt.Fprintf(&b, "- `%s`: %s", m.Mode, m.What)
		failed := 0
		for _, run := range m.Runs {
			if run.Err != "" {
				failed++
			}
		}
		if failed > 0 {
			fmt.Fprintf(&b, " (%d of %d runs failed, left out of the statistics)", failed, len(m.Runs))
		}
		b.WriteString("\n")
	}
	for _, n := range r.Notes {
		fmt.Fprintf(&b, "\n%s\n", n)
	}
	return b.String()
}

// diskStream says how the disk stream's socket yields, as the spec sets it.
func diskStream(s Scenario) string {
	p := "pacing " + s.Pacing
	switch s.Pacing {
	case "off":
		p = "unpaced"
	case "budget":
		p = "paced by the kernel at the budget"
	case "yield":
		p = "paced at the budget, lower while the path's queue grows (yield)"
	}
	cc := s.Congestion
	if cc == "" {
		cc = "the host's default congestion control"
	}
	return p + ", " + cc
}

func fmtRatio(x float64) string {
	if x >= 10 {
		return fmt.Sprintf("**%.0f-fold**", x)
	}
	return fmt.Sprintf("%.2f", x)
}

func bulkRate(r int64) string {
	if r < 0 {
		return "unpaced"
	}
	return fmt.Sprintf("paced at %.1f Mbit/s", float64(r)*8/1e6)
}

// PcapSummary is every run's capture summary, for pcap-summary.txt.
func (r *Results) PcapSummary() string {
	var b strings.Builder
	for _, m := range r.Modes {
		for _, run := range m.Runs {
			fmt.Fprintf(&b, "== %s, run %d\n%s", m.Mode, run.Repeat, run.PcapSummary)
			if run.Err != "" {
				fmt.Fprintf(&b, "FAILED: %s\n", run.Err)
			}
		}
	}
	return b.String()
}

// Write puts results.json, results.md and pcap-summary.txt in dir.
func (r *Results) Write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	for name, data := range map[string][]byte{
		"results.json":     append(j, '\n'),
		"results.md":       []byte(r.Markdown()),
		"pcap-summary.txt": []byte(r.PcapSummary()),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func msSince(t0, t time.Time) float64 { return float64(t.Sub(t0)) / float64(time.Millisecond) }
