// Package metrics is vmhopd's Prometheus instrumentation: the series one
// host's daemon exports on /metrics (config key "metrics_listen") and
// typed helpers the daemon and the migration path call to update them.
//
// Names follow Prometheus' conventions as Cilium's pkg/metrics applies them:
// namespace "vmhop", then a subsystem (migration, stream, disk, dns,
// redirect, peer, localapi, config, datapath), base units in the name
// (_seconds, _bytes) and _total on counters. Labels take a small, fixed set
// of values (outcomes, phases, reasons, configured peers), never a VM, a
// migration ID or an address.
//
//	vmhop_migrations_total{outcome}                      counter   migrations ended, by Outcome
//	vmhop_migration_phase_duration_seconds{phase}        histogram time spent in each phase
//	vmhop_migration_pause_seconds                        histogram the VM's pause at switchover (QEMU "downtime")
//	vmhop_stream_sent_bytes_total{stream}                counter   bytes sent to the peer, by Stream
//	vmhop_disk_rounds_total                              counter   disk delta rounds (chunked engine) or mirror passes
//	vmhop_dns_updates_total{result}                      counter   RFC 2136 UPDATEs sent, by RCODE name or "error"
//	vmhop_redirect_packets_total{direction}              counter   packets the datapath handled, from its BPF counters
//	vmhop_redirect_bytes_total{direction}                counter   bytes encapsulated/decapsulated
//	vmhop_redirect_drops_total{reason}                   counter   packets the datapath dropped, by reason
//	vmhop_peer_up{peer}                                  gauge     1 if the peer's address answered TCP at the last check
//	vmhop_peer_authenticated{peer}                       gauge     1 if mutual TLS and hello succeeded at the last check
//	vmhop_localapi_requests_total{verb,code}             counter   local API calls, by verb and HTTP status code
//	vmhop_config_reloads_total{result}                   counter   SIGHUP reloads, "applied" or "refused"
//	vmhop_config_last_reload_successful                  gauge     1 if the last reload was applied (or none was tried)
//	vmhop_redirect_events_total{event}                   counter   ARP replies, ICMP too-big sent, MSS clamped
//	vmhop_redirect_read_failed                           gauge     1 if reading the BPF counters failed on this scrape
//	vmhop_datapath_mode{mode}                            gauge     1 for the continuity mechanism in use ("ebpf" or "userspace")
//
// plus the Go runtime's and the process's standard collectors (go_*, process_*).
package metrics

import (
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every vmhop series.
const Namespace = "vmhop"

// Outcome is how a migration ended: the label of vmhop_migrations_total.
type Outcome string

// The outcomes, matching the exit codes of `vmhop migrate`.
const (
	Moved      Outcome = "moved"       // the VM runs at the destination, every step done
	Undone     Outcome = "undone"      // failed or aborted, the VM safe on the source
	MovedIssue Outcome = "moved_issue" // moved, but a follow-up (DNS, health check, drain) failed
	Refused    Outcome = "refused"     // the spec or the preflight refused it; nothing changed
)

// Stream names a data stream between hosts: the label of vmhop_stream_sent_bytes_total.
type Stream string

// The streams a migration sends.
const (
	StreamMemory  Stream = "memory"  // QEMU's migration stream (RAM and device state)
	StreamDisk    Stream = "disk"    // the disk: NBD mirror relay or chunked engine
	StreamControl Stream = "control" // peer API calls
)

// Metrics holds one vmhopd's series in its own registry (no global state:
// two daemons in one test process do not share counters). The zero value
// is not usable: call New. Its methods are safe for concurrent use; a nil
// *Metrics accepts every call and records nothing.
type Metrics struct {
	reg *prometheus.Registry

	migrations    *prometheus.CounterVec
	phaseDuration *prometheus.HistogramVec
	pause         prometheus.Histogram
	streamBytes   *prometheus.CounterVec
	diskRounds    prometheus.Counter
	dnsUpdates    *prometheus.CounterVec
	peerUp        *prometheus.GaugeVec
	peerAuth      *prometheus.GaugeVec
	localAPI      *prometheus.CounterVec
	reloads       *prometheus.CounterVec
	reloadOK      prometheus.Gauge
	datapathMode  *prometheus.GaugeVec

	mu       sync.Mutex
	peers    map[string]bool                   // peers with series
	counters func() (map[string]uint64, error) // the datapath's, nil without one
}

// New makes the series, registered in a fresh registry with the Go and
// process collectors.
func New() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), peers: map[string]bool{}}
	m.migrations = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: "migrations_total",
		Help: "Migrations this host ran as the source that ended, by outcome."}, []string{"outcome"})
	m.phaseDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Subsystem: "migration",
		Name: "phase_duration_seconds", Help: "Time spent in each phase of a migration.",
		Buckets: prometheus.ExponentialBuckets(0.01, 4, 10)}, []string{"phase"}) // 10 ms .. ~44 min
	m.pause = prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: Namespace, Subsystem: "migration",
		Name: "pause_seconds", Help: "How long the VM was paused at switchover (QEMU-reported downtime).",
		Buckets: []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}})
	m.streamBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "stream",
		Name: "sent_bytes_total", Help: "Bytes sent to peers, by stream."}, []string{"stream"})
	m.diskRounds = prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "disk",
		Name: "rounds_total", Help: "Disk copy rounds sent (chunked engine delta rounds, mirror passes)."})
	m.dnsUpdates = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "dns",
		Name: "updates_total", Help: "RFC 2136 UPDATE messages sent, by result (RCODE name, or error when none came back)."},
		[]string{"result"})
	m.peerUp = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "peer",
		Name: "up", Help: "1 if the configured peer's address accepted a TCP connection at the last check."}, []string{"peer"})
	m.peerAuth = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "peer",
		Name: "authenticated", Help: "1 if mutual TLS and hello with the configured peer succeeded at the last check."},
		[]string{"peer"})
	m.localAPI = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "localapi",
		Name: "requests_total", Help: "Local API calls, by verb and HTTP status code."}, []string{"verb", "code"})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "config",
		Name: "reloads_total", Help: "Config reloads (SIGHUP), by result: applied or refused."}, []string{"result"})
	m.reloadOK = prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "config",
		Name: "last_reload_successful", Help: "1 if the last config reload was applied or none was tried, 0 if it was refused."})
	m.reloadOK.Set(1)
	m.datapathMode = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "datapath",
		Name: "mode", Help: "1 for the network-continuity mechanism in use."}, []string{"mode"})
	m.reg.MustRegister(m.migrations, m.phaseDuration, m.pause, m.streamBytes, m.diskRounds, m.dnsUpdates,
		m.peerUp, m.peerAuth, m.localAPI, m.reloads, m.reloadOK, m.datapathMode, redirectCollector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the registry in Prometheus' text format (OpenMetrics when
// the scraper asks for it).
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{EnableOpenMetrics: true})
}

// Registry is where the series live, for a caller that adds its own.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// MigrationEnded counts a migration that ended with outcome o.
func (m *Metrics) MigrationEnded(o Outcome) {
	if m != nil {
		m.migrations.WithLabelValues(string(o)).Inc()
	}
}

// PhaseDone records that a migration spent d in phase (the migrator's
// phase names: "prepare", "disk", "memory", "switchover", ...).
func (m *Metrics) PhaseDone(phase string, d time.Duration) {
	if m != nil {
		m.phaseDuration.WithLabelValues(phase).Observe(d.Seconds())
	}
}

// Paused records the VM's pause at switchover.
func (m *Metrics) Paused(d time.Duration) {
	if m != nil {
		m.pause.Observe(d.Seconds())
	}
}

// Sent adds n bytes sent on stream s (n < 0 is ignored: counters only rise).
func (m *Metrics) Sent(s Stream, n int64) {
	if m != nil && n > 0 {
		m.streamBytes.WithLabelValues(string(s)).Add(float64(n))
	}
}

// DiskRound counts one disk copy round.
func (m *Metrics) DiskRound() {
	if m != nil {
		m.diskRounds.Inc()
	}
}

// DNSUpdate counts one RFC 2136 UPDATE by result: its RCODE's name
// ("NOERROR", "NOTAUTH", ... as miekg/dns.RcodeToString), or "error" when
// no answer came back.
func (m *Metrics) DNSUpdate(result string) {
	if m != nil {
		m.dnsUpdates.WithLabelValues(result).Inc()
	}
}

// SetPeer records the last check of configured peer name.
func (m *Metrics) SetPeer(name string, up, authenticated bool) {
	if m != nil {
		m.mu.Lock()
		m.peers[name] = true
		m.mu.Unlock()
		m.peerUp.WithLabelValues(name).Set(b2f(up))
		m.peerAuth.WithLabelValues(name).Set(b2f(authenticated))
	}
}

// KeepPeers drops the series of peers not in names (after a reload
// removed them from the config).
func (m *Metrics) KeepPeers(names []string) {
	if m == nil {
		return
	}
	keep := map[string]bool{}
	for _, n := range names {
		keep[n] = true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for p := range m.peers {
		if !keep[p] {
			m.peerUp.DeleteLabelValues(p)
			m.peerAuth.DeleteLabelValues(p)
			delete(m.peers, p)
		}
	}
}

// LocalAPI wraps the local API's handler of verb so that each call is
// counted by verb and HTTP status code (promhttp's "code" label). A nil
// *Metrics returns h itself.
func (m *Metrics) LocalAPI(verb string, h http.Handler) http.Handler {
	if m == nil {
		return h
	}
	return promhttp.InstrumentHandlerCounter(m.localAPI.MustCurryWith(prometheus.Labels{"verb": verb}), h)
}

// Reloaded records a config reload: applied, or refused (the old config kept).
func (m *Metrics) Reloaded(applied bool) {
	if m == nil {
		return
	}
	result := "refused"
	if applied {
		result = "applied"
	}
	m.reloads.WithLabelValues(result).Inc()
	m.reloadOK.Set(b2f(applied))
}

// SetDatapath records the continuity mechanism in use ("ebpf" or
// "userspace") and, for eBPF, the function that reads the datapath's BPF
// counters summed over addresses and CPUs (proxy/datapath's Totals; keys
// are its CounterNames). Scrapes call it; nil counters exports no
// vmhop_redirect_* series.
func (m *Metrics) SetDatapath(mode string, counters func() (map[string]uint64, error)) {
	if m == nil {
		return
	}
	m.datapathMode.Reset()
	m.datapathMode.WithLabelValues(mode).Set(1)
	m.mu.Lock()
	m.counters = counters
	m.mu.Unlock()
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
