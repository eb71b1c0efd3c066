package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhop/vmhop/internal/config"
)

// freeAddr is a loopback host:port nothing listens on (config files take
// no port 0).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// writeConfig writes c as a vmhopd YAML file.
func writeConfig(t *testing.T, path string, c config.Daemon) {
	t.Helper()
	var peers []string
	for _, p := range c.Peers {
		peers = append(peers, fmt.Sprintf("{name: %s, address: %q}", p.Name, p.Address))
	}
	text := fmt.Sprintf(`vmhopd:
  name: %s
  listen: %q
  socket: %s
  state_dir: %s
  uplink: %s
  address: %s
  datapath: %s
  bpffs: %s
  tls: {cert: %s, key: %s, ca: %s}
  log_level: %s
  log_format: %s
  metrics_listen: %q
  peers: [%s]
`, c.Name, c.Listen, c.Socket, c.StateDir, c.Uplink, c.Address, c.Datapath, c.BPFFS, c.TLS.Cert, c.TLS.Key, c.TLS.CA,
		c.LogLevel, c.LogFormat, c.MetricsListen, strings.Join(peers, ", "))
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

// scrapeMetrics GETs /metrics from d and returns its lines as a set.
func scrapeMetrics(t *testing.T, d *Daemon) map[string]bool {
	t.Helper()
	resp, err := http.Get("http://" + d.MetricsAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	lines := map[string]bool{}
	for _, l := range strings.Split(string(body), "\n") {
		lines[l] = true
	}
	return lines
}

func wantSeries(t *testing.T, lines map[string]bool, want ...string) {
	t.Helper()
	for _, w := range want {
		if !lines[w] {
			t.Errorf("/metrics lacks %q", w)
		}
	}
}

// TestReload: a reload applies a new log level and peers list (a peer
// added is let in and called, one removed is refused, even on the
// connection it kept open); a broken file, or one that changes a key
// bound to a listener, is refused naming the key, and the running config
// is kept whole. /metrics counts the reloads and the peers checked.
func TestReload(t *testing.T) {
	ca := newTestCA(t)
	aCfg := ca.config(t, "site-a")
	aCfg.Listen, aCfg.MetricsListen = freeAddr(t), freeAddr(t)
	aCfg.Uplink, aCfg.Address = "lo", netip.MustParseAddr("127.0.0.1")
	b := start(t, ca.config(t, "site-b", "site-a="+aCfg.Listen), Options{}, nil)
	level := new(slog.LevelVar)
	a := start(t, aCfg, Options{Level: level, PeerCheckInterval: -1}, nil)
	lc := NewLocalClient(aCfg.Socket)
	ctx := context.Background()
	file := filepath.Join(t.TempDir(), "vmhopd.yaml")
	reload := func(c config.Daemon) (Status, error) {
		t.Helper()
		writeConfig(t, file, c)
		err := a.Reload(file)
		st, serr := lc.Status(ctx)
		if serr != nil {
			t.Fatal(serr)
		}
		return st, err
	}

	// Before: no peers; site-b cannot call site-a (refused in the handshake).
	toA, _ := b.Peer("site-a")
	if _, err := toA.Hello(ctx, b.hello()); err == nil {
		t.Fatal("site-a let site-b in before it was configured")
	}

	// Add site-b and raise the log level to debug.
	next := aCfg
	next.LogLevel = "debug"
	next.Peers = []config.Peer{{Name: "site-b", Address: b.PeerAddr().String()}}
	st, err := reload(next)
	if err != nil || fmt.Sprint(st.Peers) != "[site-b]" || st.LogLevel != "debug" || st.Reload == nil || !st.Reload.Applied {
		t.Fatalf("reload adding site-b: %v; status %+v", err, st)
	}
	if level.Level() != slog.LevelDebug {
		t.Errorf("log level %v after reload, want debug", level.Level())
	}
	ps, err := lc.Peers(ctx)
	if err != nil || len(ps) != 1 || !ps[0].Authenticated {
		t.Fatalf("peers after reload: %+v, %v", ps, err)
	}
	if h, err := toA.Hello(ctx, b.hello()); err != nil || h.Name != "site-a" {
		t.Fatalf("site-b -> site-a after reload: %+v, %v", h, err)
	}
	wantSeries(t, scrapeMetrics(t, a),
		`vmhop_config_reloads_total{result="applied"} 1`,
		`vmhop_config_last_reload_successful 1`,
		`vmhop_peer_up{peer="site-b"} 1`,
		`vmhop_peer_authenticated{peer="site-b"} 1`,
		`vmhop_localapi_requests_total{code="200",verb="peers"} 1`,
		`vmhop_localapi_requests_total{code="200",verb="status"} 1`,
	)

	// A broken file and a change of a listener's key are refused whole.
	broken := next
	broken.LogLevel = "loud"
	broken.Peers = nil
	st, err = reload(broken)
	if err == nil || !strings.Contains(err.Error(), `vmhopd.log_level: "loud" is not one of debug, info, warn, error`) {
		t.Errorf("broken file: %v", err)
	}
	if st.Reload == nil || st.Reload.Applied || !strings.Contains(st.Reload.Error, "vmhopd.log_level") ||
		st.LogLevel != "debug" || fmt.Sprint(st.Peers) != "[site-b]" || level.Level() != slog.LevelDebug {
		t.Errorf("after a broken file: status %+v, level %v (want the old config kept)", st, level.Level())
	}
	moved := next
	moved.Listen = freeAddr(t)
	moved.LogLevel = "warn"
	if _, err = reload(moved); err == nil || !strings.Contains(err.Error(), "vmhopd.listen: cannot change without a restart") {
		t.Errorf("listen changed: %v", err)
	}
	if level.Level() != slog.LevelDebug {
		t.Errorf("a refused reload changed the log level to %v", level.Level())
	}
	wantSeries(t, scrapeMetrics(t, a),
		`vmhop_config_reloads_total{result="refused"} 2`,
		`vmhop_config_last_reload_successful 0`,
	)

	// Remove site-b: its next call is refused, on its kept connection too.
	none := next
	none.Peers = nil
	if st, err = reload(none); err != nil || len(st.Peers) != 0 {
		t.Fatalf("reload removing site-b: %v; status %+v", err, st)
	}
	if _, err := toA.Hello(ctx, b.hello()); CodeOf(err) != CodePermissionDenied {
		t.Errorf("site-b -> site-a after its removal: %v (want permission_denied)", err)
	}
	if _, err := a.Peer("site-b"); CodeOf(err) != CodeNotFound {
		t.Errorf("site-a still has a client for site-b: %v", err)
	}
	if lines := scrapeMetrics(t, a); lines[`vmhop_peer_up{peer="site-b"} 1`] {
		t.Error("/metrics still has the removed peer")
	}
}
