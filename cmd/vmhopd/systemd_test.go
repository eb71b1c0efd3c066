package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/daemon/pki"
)

// notifySocket is a fake $NOTIFY_SOCKET: the unixgram socket systemd
// reads sd_notify(3) messages from.
type notifySocket struct {
	path string
	conn *net.UnixConn
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &notifySocket{path: path, conn: conn}
}

// next returns the next message, or "" after timeout.
func (n *notifySocket) next(timeout time.Duration) string {
	n.conn.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 4096)
	k, err := n.conn.Read(buf)
	if err != nil {
		return ""
	}
	return string(buf[:k])
}

// await reads messages until want arrives (skipping WATCHDOG=1 pings,
// counted in pings) and fails the test after 10 s.
func (n *notifySocket) await(t *testing.T, want string, pings *int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		switch m := n.next(time.Until(deadline)); m {
		case want:
			return
		case "WATCHDOG=1":
			*pings++
		case "":
		default:
			t.Fatalf("sd_notify: got %q while waiting for %q", m, want)
		}
	}
	t.Fatalf("sd_notify: no %q within 10 s", want)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestSystemdNotifyAndReload runs the real vmhopd as systemd would
// (Type=notify, WatchdogSec): READY=1 only once its local API, peer API
// and /metrics answer; WATCHDOG=1 every half WATCHDOG_USEC; SIGHUP
// reloads (RELOADING=1 then READY=1) a new log level and peers list, and
// refuses a broken file naming the key while keeping the running config;
// every stderr line is a JSON record (log_format: json); /metrics passes
// promtool; SIGTERM sends STOPPING=1 and exits 0. Needs no root: the
// userspace datapath attaches nothing.
func TestSystemdNotifyAndReload(t *testing.T) {
	bin := buildVmhopd(t)
	dir := t.TempDir()
	ca, err := pki.NewCA("vmhop test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue("site-a", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM(), 0o644)
	os.WriteFile(filepath.Join(dir, "host.pem"), certPEM, 0o644)
	os.WriteFile(filepath.Join(dir, "host-key.pem"), keyPEM, 0o600)
	sock, metricsAddr, listen := filepath.Join(dir, "vmhopd.sock"), freeAddr(t), freeAddr(t)
	cfg := filepath.Join(dir, "vmhopd.yaml")
	write := func(level, peers string) {
		os.WriteFile(cfg, []byte(fmt.Sprintf(`vmhopd:
  name: site-a
  listen: "%s"
  socket: %s
  state_dir: %s/state
  uplink: lo
  address: 127.0.0.1
  datapath: userspace
  tls: {cert: %s/host.pem, key: %s/host-key.pem, ca: %s/ca.pem}
  log_level: %s
  log_format: json
  metrics_listen: "%s"
  peers: [%s]
`, listen, sock, dir, dir, dir, dir, level, metricsAddr, peers)), 0o644)
	}
	write("info", `{name: site-b, address: "127.0.0.1:1"}`)

	ns := newNotifySocket(t)
	stderr, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	d := exec.Command(bin, "-config", cfg)
	d.Env = append(os.Environ(), "NOTIFY_SOCKET="+ns.path, "WATCHDOG_USEC=200000")
	d.Stderr = stderr
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Process.Kill(); d.Wait() })
	logs := func() string { b, _ := os.ReadFile(stderr.Name()); return string(b) }

	pings := 0
	ns.await(t, "READY=1", &pings)
	ctx := context.Background()
	lc := daemon.NewLocalClient(sock)
	st, err := lc.Status(ctx)
	if err != nil || st.Listen != listen || st.Metrics != metricsAddr || st.LogLevel != "info" {
		t.Fatalf("status right after READY=1: %+v, %v; log:\n%s", st, err, logs())
	}
	if c, err := net.Dial("tcp", listen); err != nil {
		t.Errorf("peer API not listening at READY=1: %v", err)
	} else {
		c.Close()
	}
	before := pings
	t0 := time.Now()
	for time.Since(t0) < time.Second {
		if m := ns.next(time.Second - time.Since(t0)); m == "WATCHDOG=1" {
			pings++
		} else if m != "" {
			t.Errorf("sd_notify: unexpected %q", m)
		}
	}
	// WATCHDOG_USEC=200000: a ping every 100 ms, ~10 in a second.
	if n := pings - before; n < 6 || n > 14 {
		t.Errorf("%d WATCHDOG=1 in 1 s, want ~10 (every 100 ms)", n)
	}
	t.Logf("%d WATCHDOG=1 in 1 s with WATCHDOG_USEC=200000", pings-before)

	// SIGHUP: debug level and a second peer.
	write("debug", `{name: site-b, address: "127.0.0.1:1"}, {name: site-c, address: "127.0.0.1:2"}`)
	d.Process.Signal(syscall.SIGHUP)
	ns.await(t, "RELOADING=1", &pings)
	ns.await(t, "READY=1", &pings)
	st, err = lc.Status(ctx)
	if err != nil || fmt.Sprint(st.Peers) != "[site-b site-c]" || st.LogLevel != "debug" || st.Reload == nil || !st.Reload.Applied {
		t.Fatalf("status after reload: %+v, %v; log:\n%s", st, err, logs())
	}

	// SIGHUP with a broken file: refused, the key named, the old config kept.
	write("loud", "")
	d.Process.Signal(syscall.SIGHUP)
	ns.await(t, "RELOADING=1", &pings)
	ns.await(t, "READY=1", &pings)
	st, err = lc.Status(ctx)
	if err != nil || st.Reload == nil || st.Reload.Applied || !strings.Contains(st.Reload.Error, `vmhopd.log_level: "loud" is not one of`) ||
		fmt.Sprint(st.Peers) != "[site-b site-c]" || st.LogLevel != "debug" {
		t.Fatalf("status after a broken file: %+v, %v", st, err)
	}

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`vmhop_datapath_mode{mode="userspace"} 1`,
		`vmhop_config_reloads_total{result="applied"} 1`,
		`vmhop_config_reloads_total{result="refused"} 1`,
		`vmhop_config_last_reload_successful 0`,
		`vmhop_localapi_requests_total{code="200",verb="status"} 3`,
	} {
		if !strings.Contains(string(body), want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if promtool, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(string(body))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	} else {
		t.Log("promtool not found (Debian package prometheus): /metrics checked by series only")
	}

	d.Process.Signal(syscall.SIGTERM)
	ns.await(t, "STOPPING=1", &pings)
	if err := d.Wait(); err != nil {
		t.Fatalf("vmhopd exit: %v; log:\n%s", err, logs())
	}

	// log_format json: every line a record; the debug level took effect
	// with the reload (the status calls after it are logged at DEBUG).
	debugCalls := 0
	for _, line := range strings.Split(strings.TrimSpace(logs()), "\n") {
		var rec struct{ Time, Level, Msg, Verb string }
		if err := json.Unmarshal([]byte(line), &rec); err != nil || rec.Time == "" || rec.Level == "" || rec.Msg == "" {
			t.Errorf("stderr line is not a JSON log record (%v): %s", err, line)
		}
		if rec.Level == "DEBUG" && rec.Msg == "local API call" && rec.Verb == "status" {
			debugCalls++
		}
	}
	if debugCalls != 2 {
		t.Errorf("%d status calls logged at DEBUG, want 2 (those after the reload to debug)", debugCalls)
	}
}

// TestUnitVerifies runs `systemd-analyze verify` on configs/vmhopd.service
// (its vmhopd path pointed at a fresh build: verify checks that ExecStart
// exists): it must exit 0 and print nothing (unknown keys and bad values
// are only warnings, printed, with exit status 0).
func TestUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found: install Debian's systemd package (scripts/install-deps.sh)")
	}
	unit, err := os.ReadFile("../../configs/vmhopd.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify\n", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID\n",
		"ExecStart=/usr/bin/vmhopd -config /etc/vmhop/vmhopd.yaml\n", "ProtectSystem=strict\n", "NoNewPrivileges=yes\n",
		"RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET\n", "StateDirectory=vmhop\n", "RuntimeDirectory=vmhop\n"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	bin := buildVmhopd(t)
	path := filepath.Join(t.TempDir(), "vmhopd.service")
	os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/bin/vmhopd", bin)), 0o644)
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}
