package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/daemon/pki"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
)

func TestMain(m *testing.M) {
	lab.RunChild() // the lab's WAN emulator re-executes the test binary
	os.Exit(m.Run())
}

// TestDaemonLifecycle runs the real vmhopd in a namespace: it attaches the
// datapath, leaves it pinned when stopped (forwarding goes on), and
// -cleanup removes it.
func TestDaemonLifecycle(t *testing.T) {
	ns := labtest.Netns(t)
	bin := buildVmhopd(t)
	ctx := context.Background()
	for _, args := range [][]string{
		{"link", "add", "u0", "type", "veth", "peer", "name", "u1"},
		{"link", "set", "u0", "up"},
		{"link", "set", "lo", "up"}, // /metrics is scraped at 10.9.0.2 from inside
		{"addr", "add", "10.9.0.2/24", "dev", "u0"},
	} {
		if _, err := netns.Run(ctx, ns, "ip", args...); err != nil {
			t.Fatal(err)
		}
	}
	pins := "/sys/fs/bpf/vmhop/" + ns
	t.Cleanup(func() { os.RemoveAll(pins) })
	cfg := filepath.Join(t.TempDir(), "vmhopd.yaml")
	sock := filepath.Join(t.TempDir(), "vmhopd.sock")
	os.WriteFile(cfg, []byte(fmt.Sprintf("vmhopd:\n  uplink: u0\n  address: 10.9.0.2\n  bpffs: %s\n  datapath: ebpf\n  state_dir: %s\n  socket: %s\n  metrics_listen: \"10.9.0.2:9710\"\n",
		pins, t.TempDir(), sock)), 0o644)

	// nsenter enters the network namespace only: `ip netns exec` would also
	// remount /sys, hiding the host's bpffs (and the daemon's pins with it).
	d := exec.CommandContext(ctx, "nsenter", "--net="+netns.Path(ns), bin, "-config", cfg)
	var logs strings.Builder
	d.Stderr = &logs
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	attached := false
	for i := 0; i < 100 && !attached; i++ {
		ents, _ := os.ReadDir(pins)
		for _, e := range ents {
			attached = attached || strings.HasPrefix(e.Name(), "link-uplink-")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !attached {
		d.Process.Kill()
		d.Wait()
		t.Fatalf("vmhopd did not pin its uplink link; log:\n%s", logs.String())
	}
	if st, err := daemon.NewLocalClient(sock).Status(ctx); err != nil || st.Listen != "" {
		t.Errorf("local API: %+v, %v (want no peer API without tls)", st, err)
	}
	// /metrics, scraped inside the namespace: the eBPF datapath's counters
	// are there (all zero: no packet went through).
	var scrape []byte
	err := netns.Do(ns, func() error {
		c, err := net.DialTimeout("tcp", "10.9.0.2:9710", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(c, "GET /metrics HTTP/1.0\r\nHost: vmhopd\r\n\r\n")
		scrape, err = io.ReadAll(c)
		return err
	})
	if err != nil {
		t.Fatalf("scrape /metrics in %s: %v", ns, err)
	}
	for _, want := range []string{"HTTP/1.0 200 OK", `vmhop_datapath_mode{mode="ebpf"} 1`, `vmhop_redirect_packets_total{direction="encap"} 0`,
		`vmhop_redirect_drops_total{reason="no_route"} 0`, "vmhop_redirect_read_failed 0"} {
		if !strings.Contains(string(scrape), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	d.Process.Signal(syscall.SIGTERM)
	if err := d.Wait(); err != nil {
		t.Fatalf("vmhopd exit: %v; log:\n%s", err, logs.String())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("local API socket left after SIGTERM: %v", err)
	}
	if !strings.Contains(logs.String(), "continuity=ebpf") {
		t.Errorf("log does not say which mechanism: %s", logs.String())
	}
	if ents, _ := os.ReadDir(pins); len(ents) == 0 {
		t.Fatal("stopping vmhopd removed the pinned datapath")
	}
	if out, err := exec.CommandContext(ctx, "nsenter", "--net="+netns.Path(ns), bin, "-config", cfg, "-cleanup").CombinedOutput(); err != nil {
		t.Fatalf("cleanup: %v: %s", err, out)
	}
	if _, err := os.Stat(pins); !os.IsNotExist(err) {
		ents, _ := os.ReadDir(pins)
		t.Fatalf("pins left after -cleanup: %v", ents)
	}
}

// TestCheckNamesTheTLSKey: -check reads the tls files, and its error
// names the key at fault (no root needed).
func TestCheckNamesTheTLSKey(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "vmhopd.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("vmhopd:\n  name: site-a\n  uplink: u0\n  address: 10.9.0.2\n  state_dir: %s\n"+
		"  tls: {cert: %s/a.pem, key: %s/a-key.pem, ca: %s/ca.pem}\n", dir, dir, dir, dir)), 0o644)
	flags.config, flags.check = cfg, true
	defer func() { flags.config, flags.check = "", false }()
	err := run()
	if err == nil || !strings.Contains(err.Error(), "vmhopd.tls.cert, vmhopd.tls.key: load") {
		t.Fatalf("run -check: %v", err)
	}
}

func buildVmhopd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "vmhopd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// TestTwoDaemonsAuthenticate runs two real vmhopd processes, each in its
// own network namespace with its own config, key and certificate (from
// one CA, made with daemon/pki as `vmhop certs` makes them), joined by a
// veth: each finds the other reachable and authenticated (mutual TLS and
// hello over the link), and both stop cleanly on SIGTERM.
func TestTwoDaemonsAuthenticate(t *testing.T) {
	nsA, nsB := labtest.Netns(t), labtest.Netns(t)
	bin := buildVmhopd(t)
	ctx := context.Background()
	for _, c := range []struct {
		ns   string
		args []string
	}{
		{nsA, []string{"link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", nsB}},
		{nsA, []string{"addr", "add", "10.77.0.1/24", "dev", "va"}},
		{nsA, []string{"link", "set", "va", "up"}},
		{nsB, []string{"addr", "add", "10.77.0.2/24", "dev", "vb"}},
		{nsB, []string{"link", "set", "vb", "up"}},
	} {
		if _, err := netns.Run(ctx, c.ns, "ip", c.args...); err != nil {
			t.Fatal(err)
		}
	}
	greetEachOther(t, bin, []*daemonHost{
		{name: "site-a.vmhop", ns: nsA, dev: "va", addr: "10.77.0.1"},
		{name: "site-b.vmhop", ns: nsB, dev: "vb", addr: "10.77.0.2"},
	}, nil)
}

// TestDaemonsOverLabWAN is TestTwoDaemonsAuthenticate between the lab's
// two sites, over its emulated WAN (40 ms RTT): the daemons run where the
// lab's hosts are, on their own addresses.
func TestDaemonsOverLabWAN(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	bin := buildVmhopd(t)
	hosts := []*daemonHost{
		{name: "site-a.vmhop", ns: l.NS(lab.SiteA), dev: lab.LANIf(lab.SiteA), addr: "10.1.0.2"},
		{name: "site-b.vmhop", ns: l.NS(lab.SiteB), dev: lab.LANIf(lab.SiteB), addr: "10.2.0.2"},
	}
	greetEachOther(t, bin, hosts, func(ca *pki.CA, caFile string) {
		// From the lab's client host, two impostors try to hand a secret
		// to site B: one naming a listed peer with a certificate from
		// another CA, one with a certificate from the CA naming no peer.
		// Both trust the real CA, so it is site B that refuses them.
		// The other CA copies the real one's name: a Go client sends only
		// a certificate whose issuer the server's certificate_authorities
		// list names (RFC 8446 4.2.4), else none ("certificate required").
		other, _ := pki.NewCA("vmhop test CA", time.Hour)
		for _, tt := range []struct {
			name  string
			ca    *pki.CA
			alert string
		}{
			{"site-a.vmhop", other, "unknown certificate authority"},
			{"site-c.vmhop", ca, "bad certificate"},
		} {
			cfg := config.DefaultDaemon()
			dir := t.TempDir()
			cfg.Name, cfg.StateDir = tt.name, dir
			certPEM, keyPEM, _ := tt.ca.Issue(tt.name, nil, time.Hour)
			os.WriteFile(filepath.Join(dir, "c.pem"), certPEM, 0o644)
			os.WriteFile(filepath.Join(dir, "k.pem"), keyPEM, 0o600)
			os.WriteFile(filepath.Join(dir, "ca.pem"), append(other.CertPEM(), ca.CertPEM()...), 0o644)
			cfg.TLS = config.TLS{Cert: filepath.Join(dir, "c.pem"), Key: filepath.Join(dir, "k.pem"), CA: filepath.Join(dir, "ca.pem")}
			cfg.Peers = []config.Peer{{Name: "site-b.vmhop", Address: "10.2.0.2:7710"}}
			d, err := daemon.New(cfg, daemon.Options{PeerDial: netns.DialFunc(l.NS(lab.Client))})
			if err != nil {
				t.Fatal(err)
			}
			_, err = d.HandOverSecret(context.Background(), "site-b.vmhop", "web1-00000001", "psk", 32)
			if err == nil || !strings.Contains(err.Error(), "remote error: tls: "+tt.alert) {
				t.Errorf("impostor %s: %v, want the TLS alert %q", tt.name, err, tt.alert)
			}
		}
		if ents, err := os.ReadDir(hosts[1].state); err != nil || len(ents) != 0 {
			t.Errorf("site B's state_dir after the impostors: %v, %v; want it empty", ents, err)
		}
	})
	for _, h := range hosts {
		// A new connection: TCP (1 RTT), TLS 1.3 (1 RTT), the call (1 RTT).
		// The next call reuses it: 1 RTT.
		if h.hello < 80*time.Millisecond || h.rehello < 35*time.Millisecond || h.rehello > h.hello {
			t.Errorf("%s: hello over a 40 ms RTT WAN took %s, then %s: want over 80 ms, then 1 RTT", h.name, h.hello, h.rehello)
		}
	}
}

// daemonHost is one vmhopd of greetEachOther.
type daemonHost struct {
	name, ns, dev, addr string
	sock, state         string
	hello               time.Duration // its peer's hello on a new connection, as the peers verb measured it
	rehello             time.Duration // the next one, on the connection kept open
}

// greetEachOther starts vmhopd on each host (in its namespace, its own
// config and certificate, every other host its peer), checks that each
// finds every other reachable and authenticated, and stops them with
// SIGTERM, checking their exit. while, if set, runs before they stop,
// with the CA.
func greetEachOther(t *testing.T, bin string, hosts []*daemonHost, while func(ca *pki.CA, caFile string)) {
	ctx := context.Background()
	ca, err := pki.NewCA("vmhop test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM(), 0o644)
	var procs []*exec.Cmd
	var logs []*strings.Builder
	for _, h := range hosts {
		certPEM, keyPEM, err := ca.Issue(h.name, nil, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		hd := t.TempDir()
		os.WriteFile(filepath.Join(hd, "host.pem"), certPEM, 0o644)
		os.WriteFile(filepath.Join(hd, "host-key.pem"), keyPEM, 0o600)
		h.sock, h.state = filepath.Join(hd, "vmhopd.sock"), filepath.Join(hd, "state")
		os.Mkdir(h.state, 0o700)
		var peers []string
		for _, p := range hosts {
			if p != h {
				peers = append(peers, fmt.Sprintf(`{name: %s, address: "%s:7710"}`, p.name, p.addr))
			}
		}
		cfg := filepath.Join(hd, "vmhopd.yaml")
		os.WriteFile(cfg, []byte(fmt.Sprintf(`vmhopd:
  name: %s
  listen: %s:7710
  socket: %s
  peers: [%s]
  state_dir: %s
  uplink: %s
  address: %s
  datapath: userspace
  tls: {cert: %s/host.pem, key: %s/host-key.pem, ca: %s/ca.pem}
`, h.name, h.addr, h.sock, strings.Join(peers, ", "), h.state, h.dev, h.addr, hd, hd, dir)), 0o644)
		d := exec.CommandContext(ctx, "nsenter", "--net="+netns.Path(h.ns), bin, "-config", cfg)
		var log strings.Builder
		d.Stderr = &log
		if err := d.Start(); err != nil {
			t.Fatal(err)
		}
		procs, logs = append(procs, d), append(logs, &log)
		t.Cleanup(func() { d.Process.Kill(); d.Wait() })
	}
	for i, h := range hosts {
		var ps []daemon.PeerStatus
		var err error
		authenticated := func() bool {
			for _, p := range ps {
				if !p.Authenticated {
					return false
				}
			}
			return len(ps) == len(hosts)-1
		}
		for try := 0; try < 100; try++ {
			if ps, err = daemon.NewLocalClient(h.sock).Peers(ctx); err == nil && authenticated() {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil || !authenticated() {
			t.Fatalf("%s: peers = %+v, %v; log:\n%s", h.name, ps, err, logs[i])
		}
		for _, p := range ps {
			if !p.Reachable || p.Protocol != daemon.ProtocolVersion {
				t.Errorf("%s: peer %+v", h.name, p)
			}
			h.hello = time.Duration(p.HelloMillis * float64(time.Millisecond))
			t.Logf("%s -> %s: hello in %.1f ms (new connection)", h.name, p.Name, p.HelloMillis)
		}
	}
	for _, h := range hosts {
		ps, err := daemon.NewLocalClient(h.sock).Peers(ctx)
		if err != nil || len(ps) == 0 || !ps[0].Authenticated {
			t.Fatalf("%s: second peers: %+v, %v", h.name, ps, err)
		}
		h.rehello = time.Duration(ps[0].HelloMillis * float64(time.Millisecond))
		t.Logf("%s -> %s: hello in %.1f ms (connection kept open)", h.name, ps[0].Name, ps[0].HelloMillis)
	}
	if while != nil {
		while(ca, filepath.Join(dir, "ca.pem"))
	}
	for i, d := range procs {
		d.Process.Signal(syscall.SIGTERM)
		if err := d.Wait(); err != nil {
			t.Errorf("%s exit: %v; log:\n%s", hosts[i].name, err, logs[i])
		}
	}
}
