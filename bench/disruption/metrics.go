package main

import (
	"math"
	"sort"
	"time"

	"github.com/vmhop/vmhop/internal/labrun"
)

// runData is one move, whatever the mode, as the metrics need it.
type runData struct {
	Start         time.Time     // the move started (migration, or the freeze)
	Stopped       time.Time     // the VM stopped running at site A
	Resumed       time.Time     // the VM ran at site B
	Total         time.Duration // the whole move, start to its last step
	Pause         time.Duration // the VM did not run: QEMU's pause, or stop to boot
	Phases        []labrun.Span
	View          labrun.ClientView
	MigrationWire int64 // bytes the move sent between the sites
	Capture       *Capture
	Bulk          []uint16      // the bulk download's client ports
	EchoEvery     time.Duration // each echo connection's interval (0: 10 ms)
	// NoMove: a control run (nothing moved): no pause, move time, wire
	// bytes or new address to measure.
	NoMove bool
}

// metric is one column of the results: its name carries its unit.
type metric struct {
	Name, What string
}

// metrics are every run's measurements, in the order of the tables.
var metrics = []metric{
	{"vm_pause_ms", "VM not running: QEMU's pause (live), stop to boot answering at B (freeze-and-copy)"},
	{"disruption_total_ms", "total disruption as the README defines it: worst echo connection, gaps over 30 ms less the 10 ms interval"},
	{"disruption_outage_ms", "the same over gaps over 100 ms only"},
	{"echo_gap_longest_ms", "longest gap of any persistent echo connection (in-flight)"},
	{"echo_gap_switchover_ms", "longest gap of any echo connection that overlaps the VM's pause (stopped at A to running at B): what the switchover costs a connection in flight"},
	{"echo_gap_copy_longest_ms", "longest gap of any echo connection that ended before the VM stopped (while it ran at A during the move: the copy's load on the host and the uplink)"},
	{"echo_gap_total_mean_ms", "gaps over 30 ms summed per echo connection, mean over connections"},
	{"bulk_gap_longest_ms", "longest gap in the bulk download's arriving data"},
	{"bulk_received_bytes", "bytes the bulk download received during the load"},
	{"tcp_retransmits", "TCP segments seen again at the client (both directions)"},
	{"tcp_rto_retransmits", "of them, resent >= 200 ms after the previous copy (retransmission timeouts)"},
	{"tcp_resets", "RST segments at the client"},
	{"echo_reconnects", "persistent connections given up (2 s without an answer) and made anew by name"},
	{"http_failed", "new HTTP connections by name that failed"},
	{"http_fail_window_ms", "new-connection failure window: first failure's start to last failure's end"},
	{"new_addr_after_stop_ms", "VM stopped at A to the first new connection served at the new address"},
	{"ping_lost", "ICMP echoes (every 10 ms) never answered"},
	{"ping_rtt_before_ms", "median ICMP round trip in the second before the move (the path without migration traffic)"},
	{"ping_rtt_copy_median_ms", "median ICMP round trip while the VM ran at site A during the move (the copy: disk and memory streams on A's uplink)"},
	{"ping_rtt_copy_p99_ms", "99th percentile of the same (ICMP is answered by the guest's kernel: it shows the uplink's queue)"},
	{"echo_rtt_copy_p99_ms", "99th percentile echo round trip over the same stretch (answered by a guest process: queue plus guest scheduling)"},
	{"total_move_ms", "the whole move: migration's total, or freeze to the VM answering at B"},
	{"migration_wire_bytes", "bytes the move sent between the sites (memory + disk, or the disk copy)"},
	{"client_wire_bytes", "bytes on the client's wire in the capture (load traffic, both directions)"},
}

// compute measures one run.
func compute(d runData) map[string]float64 {
	ms := func(x time.Duration) float64 { return float64(x) / float64(time.Millisecond) }
	m := map[string]float64{}
	if !d.NoMove {
		m["vm_pause_ms"] = ms(d.Pause)
		m["total_move_ms"] = ms(d.Total)
		m["migration_wire_bytes"] = float64(d.MigrationWire)
	}
	var worst labrun.Disruption
	var longest, sum, across, before time.Duration
	split := false
	reconnects := 0
	echo := d.View.Echo
	if d.Capture != nil {
		// The gaps between deliveries of new reply bytes, in order: a
		// retransmitted duplicate (the moved VM resending what the client
		// had, on a connection that is otherwise dead) is no answer.
		echo = append([]labrun.EchoView(nil), echo...)
		for i, e := range echo {
			var arr []time.Time
			seen := false
			for _, p := range e.Ports {
				if cs := d.Capture.Conns[ConnKey{p, labrun.EchoPort}]; cs != nil {
					arr = append(arr, cs.Progress...)
					seen = true
				}
			}
			if !seen {
				continue
			}
			var from time.Time
			if len(arr) == 0 {
				from = d.View.Start
			}
			every := d.EchoEvery
			if every == 0 {
				every = 10 * time.Millisecond
			}
			echo[i].Disruption = labrun.GapsIn(arr, every, from, d.View.End)
			if !d.Stopped.IsZero() {
				a, b := splitGaps(arr, from, d.View.End, d.Start, d.Stopped, d.Resumed)
				across, before, split = max(across, a), max(before, b), true
			}
		}
	}
	for _, e := range echo {
		if e.Disruption.Total >= worst.Total {
			worst = e.Disruption
		}
		longest = max(longest, e.Disruption.Longest)
		sum += e.Disruption.Total
		reconnects += e.Reconnects
	}
	m["disruption_total_ms"] = ms(worst.Total)
	m["disruption_outage_ms"] = ms(worst.Outage)
	m["echo_gap_longest_ms"] = ms(longest)
	if split {
		if !d.NoMove {
			m["echo_gap_switchover_ms"] = ms(across)
		}
		if d.Stopped.After(d.Start) { // freeze-and-copy stops at once: no copy while it runs
			m["echo_gap_copy_longest_ms"] = ms(before)
		}
	}
	if n := len(echo); n > 0 {
		m["echo_gap_total_mean_ms"] = ms(sum) / float64(n)
	}
	m["echo_reconnects"] = float64(reconnects)
	h := d.View.HTTP
	m["http_failed"] = float64(h.Failed)
	m["http_fail_window_ms"] = ms(h.FailWindow)
	m["ping_lost"] = float64(d.View.Ping.Lost)
	m["bulk_received_bytes"] = float64(d.View.Bulk.Bytes)
	if h.NewAddrAt > 0 && !d.Stopped.IsZero() && !d.NoMove {
		m["new_addr_after_stop_ms"] = ms(d.View.Start.Add(h.NewAddrAt).Sub(d.Stopped))
	}
	if c := d.Capture; c != nil {
		for k, v := range rttMetrics(c.Samples, d.Start, d.Stopped) {
			m[k] = v
		}
		m["tcp_retransmits"] = float64(c.Retransmits)
		m["tcp_rto_retransmits"] = float64(c.RTORetransmits)
		m["tcp_resets"] = float64(c.Resets)
		m["client_wire_bytes"] = float64(c.WireBytes)
		// The bulk download's data, over all its connections, from its
		// first byte to the end of the load.
		var arr []time.Time
		for _, p := range d.Bulk {
			if cs := c.Conns[ConnKey{p, 80}]; cs != nil {
				arr = append(arr, cs.Progress...)
			}
		}
		if len(d.Bulk) > 0 {
			var from time.Time
			if len(arr) == 0 {
				from = d.View.Start
			}
			m["bulk_gap_longest_ms"] = ms(labrun.GapsIn(arr, 10*time.Millisecond, from, d.View.End).Longest)
		}
	}
	return m
}

// splitGaps returns, over the gaps between arrivals (bounded by from and
// end as labrun.GapsIn bounds them), the longest that overlaps the pause
// [stopped, resumed] and the longest that ended after start and by
// stopped (the move under way, the VM still at A). A zero resumed (a
// control run) makes the pause the instant stopped.
func splitGaps(arrivals []time.Time, from, end, start, stopped, resumed time.Time) (across, before time.Duration) {
	if resumed.Before(stopped) {
		resumed = stopped
	}
	pts := labrun.Bounded(append([]time.Time(nil), arrivals...), from, end)
	for i := 1; i < len(pts); i++ {
		p, q := pts[i-1], pts[i]
		switch g := q.Sub(p); {
		case !q.After(stopped):
			if q.After(start) {
				before = max(before, g)
			}
		case p.Before(resumed) || p.Equal(resumed) && resumed.Equal(stopped):
			across = max(across, g)
		}
	}
	return across, before
}

// bulkPorts lists the bulk download's client ports.
func bulkPorts(v labrun.ClientView) []uint16 {
	var out []uint16
	for _, c := range v.Bulk.Conns {
		out = append(out, c.Port)
	}
	return out
}

// rttMetrics are the round trips of the answered probes: ICMP in the
// second before start, ICMP and echo from start to stopped (the VM still
// at site A). A stretch without answers gives no value.
func rttMetrics(samples []Sample, start, stopped time.Time) map[string]float64 {
	var before, ping, echo []float64
	for _, s := range samples {
		if s.Latency < 0 {
			continue
		}
		ms := float64(s.Latency) / float64(time.Millisecond)
		switch {
		case s.Kind == "icmp" && !s.At.Before(start.Add(-time.Second)) && s.At.Before(start):
			before = append(before, ms)
		case !s.At.Before(start) && s.At.Before(stopped) && s.Kind == "icmp":
			ping = append(ping, ms)
		case !s.At.Before(start) && s.At.Before(stopped) && s.Kind == "echo":
			echo = append(echo, ms)
		}
	}
	m := map[string]float64{}
	if len(before) > 0 {
		m["ping_rtt_before_ms"] = quantile(before, 0.5)
	}
	if len(ping) > 0 {
		m["ping_rtt_copy_median_ms"] = quantile(ping, 0.5)
		m["ping_rtt_copy_p99_ms"] = quantile(ping, 0.99)
	}
	if len(echo) > 0 {
		m["echo_rtt_copy_p99_ms"] = quantile(echo, 0.99)
	}
	return m
}

// quantile is the q-quantile of v (nearest rank; v is sorted in place).
func quantile(v []float64, q float64) float64 {
	sort.Float64s(v)
	i := int(math.Ceil(q*float64(len(v)))) - 1
	return v[max(0, min(i, len(v)-1))]
}
