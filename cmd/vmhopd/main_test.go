package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
)

// TestDaemonLifecycle runs the real vmhopd in a namespace: it attaches the
// datapath, leaves it pinned when stopped (forwarding goes on), and
// -cleanup removes it.
func TestDaemonLifecycle(t *testing.T) {
	ns := labtest.Netns(t)
	bin := filepath.Join(t.TempDir(), "vmhopd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	ctx := context.Background()
	for _, args := range [][]string{
		{"link", "add", "u0", "type", "veth", "peer", "name", "u1"},
		{"link", "set", "u0", "up"},
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
	os.WriteFile(cfg, []byte(fmt.Sprintf("vmhopd:\n  uplink: u0\n  address: 10.9.0.2\n  bpffs: %s\n  datapath: ebpf\n  state_dir: %s\n  socket: %s\n",
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
