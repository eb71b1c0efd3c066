package metrics

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/proxy/datapath"
)

// scrape GETs /metrics from m's handler in Prometheus' text format.
func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("scrape: %s %q\n%s", resp.Status, resp.Header.Get("Content-Type"), body)
	}
	return string(body)
}

// promtool runs `promtool check metrics` on a scrape (Debian's prometheus
// package): it fails on malformed text and on names against Prometheus'
// conventions (units, _total on counters, ...).
func promtool(t *testing.T, text string) {
	t.Helper()
	bin, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found: install Debian's prometheus package (scripts/install-deps.sh)")
	}
	cmd := exec.Command(bin, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}

// hasLines fails unless every want line is a line of text.
func hasLines(t *testing.T, text string, want ...string) {
	t.Helper()
	lines := map[string]bool{}
	for _, l := range strings.Split(text, "\n") {
		lines[l] = true
	}
	for _, w := range want {
		if !lines[w] {
			t.Errorf("scrape lacks %q", w)
		}
	}
}

// TestSeries drives every helper and checks the scrape's exact series
// values, and that promtool accepts the whole exposition.
func TestSeries(t *testing.T) {
	m := New()
	m.MigrationEnded(Moved)
	m.MigrationEnded(Moved)
	m.MigrationEnded(Undone)
	m.PhaseDone("memory", 9*time.Second)
	m.PhaseDone("memory", 3*time.Second)
	m.Paused(73 * time.Millisecond)
	m.Sent(StreamMemory, 101711872)
	m.Sent(StreamDisk, 1<<20)
	m.Sent(StreamDisk, -5) // ignored
	m.DiskRound()
	m.DiskRound()
	m.DNSUpdate("NOERROR")
	m.DNSUpdate("NOTAUTH")
	m.SetPeer("site-b.vmhop", true, true)
	m.SetPeer("site-c.vmhop", true, false)
	local := httptest.NewServer(m.LocalAPI("migrate", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusBadRequest)
	})))
	resp, err := http.Post(local.URL, "application/yaml", strings.NewReader("bad spec"))
	if err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("local API call: %v, %v", resp, err)
	}
	resp.Body.Close()
	local.Close()
	m.Reloaded(false)
	counters := map[string]uint64{}
	for i, name := range datapath.CounterNames {
		counters[name] = uint64(i + 1)
	}
	m.SetDatapath("ebpf", func() (map[string]uint64, error) { return counters, nil })

	text := scrape(t, m)
	promtool(t, text)
	hasLines(t, text,
		`vmhop_migrations_total{outcome="moved"} 2`,
		`vmhop_migrations_total{outcome="undone"} 1`,
		`vmhop_migration_phase_duration_seconds_sum{phase="memory"} 12`,
		`vmhop_migration_phase_duration_seconds_count{phase="memory"} 2`,
		`vmhop_migration_phase_duration_seconds_bucket{phase="memory",le="10.24"} 2`,
		`vmhop_migration_phase_duration_seconds_bucket{phase="memory",le="2.56"} 0`,
		`vmhop_migration_pause_seconds_bucket{le="0.05"} 0`,
		`vmhop_migration_pause_seconds_bucket{le="0.1"} 1`,
		`vmhop_stream_sent_bytes_total{stream="memory"} 1.01711872e+08`,
		`vmhop_stream_sent_bytes_total{stream="disk"} 1.048576e+06`,
		`vmhop_disk_rounds_total 2`,
		`vmhop_dns_updates_total{result="NOERROR"} 1`,
		`vmhop_dns_updates_total{result="NOTAUTH"} 1`,
		`vmhop_peer_up{peer="site-b.vmhop"} 1`,
		`vmhop_peer_authenticated{peer="site-b.vmhop"} 1`,
		`vmhop_peer_authenticated{peer="site-c.vmhop"} 0`,
		`vmhop_localapi_requests_total{code="400",verb="migrate"} 1`,
		`vmhop_config_reloads_total{result="refused"} 1`,
		`vmhop_config_last_reload_successful 0`,
		`vmhop_datapath_mode{mode="ebpf"} 1`,
		// the datapath's counters, in the order of datapath.CounterNames (1, 2, ...)
		`vmhop_redirect_packets_total{direction="encap"} 1`,
		`vmhop_redirect_bytes_total{direction="encap"} 2`,
		`vmhop_redirect_packets_total{direction="decap"} 3`,
		`vmhop_redirect_bytes_total{direction="decap"} 4`,
		`vmhop_redirect_packets_total{direction="delivered"} 5`,
		`vmhop_redirect_packets_total{direction="tunnel_back"} 8`,
		`vmhop_redirect_events_total{event="arp_replies"} 9`,
		`vmhop_redirect_events_total{event="mss_clamped"} 11`,
		`vmhop_redirect_drops_total{reason="no_route"} 12`,
		`vmhop_redirect_drops_total{reason="too_big"} 15`,
		`vmhop_redirect_read_failed 0`,
	)

	// A reload that removed a peer drops its series.
	m.KeepPeers([]string{"site-b.vmhop"})
	m.Reloaded(true)
	text = scrape(t, m)
	if strings.Contains(text, "site-c.vmhop") {
		t.Error("series of a peer removed from the config still exported")
	}
	hasLines(t, text, `vmhop_config_reloads_total{result="applied"} 1`, `vmhop_config_last_reload_successful 1`)
}

// TestEveryDatapathCounterHasASeries: a counter added to bpf/consts.h
// without a series here fails this test.
func TestEveryDatapathCounterHasASeries(t *testing.T) {
	for _, name := range datapath.CounterNames {
		if _, _, ok := series(name); !ok {
			t.Errorf("datapath counter %q has no vmhop_redirect_* series", name)
		}
	}
}

// TestRedirectReadFailure: a failing read is a series, not a failed scrape.
func TestRedirectReadFailure(t *testing.T) {
	m := New()
	m.SetDatapath("ebpf", func() (map[string]uint64, error) { return nil, errors.New("map gone") })
	text := scrape(t, m)
	hasLines(t, text, `vmhop_redirect_read_failed 1`)
	m.SetDatapath("userspace", nil)
	text = scrape(t, m)
	hasLines(t, text, `vmhop_datapath_mode{mode="userspace"} 1`)
	if strings.Contains(text, "vmhop_redirect_") || strings.Contains(text, `mode="ebpf"`) {
		t.Errorf("userspace fallback exports eBPF series:\n%s", text)
	}
}

// TestNilMetrics: a nil *Metrics (metrics off) takes every call.
func TestNilMetrics(t *testing.T) {
	var m *Metrics
	m.MigrationEnded(Moved)
	m.PhaseDone("disk", time.Second)
	m.Paused(time.Millisecond)
	m.Sent(StreamDisk, 1)
	m.DiskRound()
	m.DNSUpdate("NOERROR")
	m.SetPeer("a", true, true)
	m.KeepPeers(nil)
	if h := m.LocalAPI("status", http.NotFoundHandler()); h == nil {
		t.Error("nil metrics: LocalAPI returned no handler")
	}
	m.Reloaded(true)
	m.SetDatapath("ebpf", nil)
}
