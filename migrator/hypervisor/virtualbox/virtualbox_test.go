package virtualbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

var fakeBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "fakevbox")
	if err != nil {
		panic(err)
	}
	fakeBin = filepath.Join(dir, "VBoxManage")
	if out, err := exec.Command("go", "build", "-o", fakeBin, "./testdata/fakevbox").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build fake VBoxManage: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// world is two hosts with VM "web1" registered on both, running on source.
type world struct {
	dir string
	env []string
}

func newWorld(t *testing.T, extra ...string) *world {
	t.Helper()
	w := &world{dir: t.TempDir(), env: extra}
	w.write("source", "running")
	w.write("dest", "poweroff")
	return w
}

func (w *world) write(host, state string) {
	b, _ := json.Marshal(map[string]any{"web1": map[string]any{"name": "web1", "state": state}})
	os.WriteFile(filepath.Join(w.dir, host+".json"), b, 0o644)
}

func (w *world) runner(host, peer string) Runner {
	return func(ctx context.Context, args ...string) *exec.Cmd {
		c := exec.CommandContext(ctx, fakeBin, args...)
		c.Env = append(os.Environ(), append([]string{"FAKEVBOX_DIR=" + w.dir, "FAKEVBOX_HOST=" + host, "FAKEVBOX_PEER=" + peer}, w.env...)...)
		return c
	}
}

func (w *world) driver() *Driver {
	return New(Config{VM: "web1", Source: w.runner("source", "dest"), Dest: w.runner("dest", "source"),
		DestHost: "10.2.0.2", Port: 6000, PasswordDir: filepath.Join(w.dir, "pw"), Poll: 10 * time.Millisecond})
}

func (w *world) state(t *testing.T, host string) string {
	t.Helper()
	s, err := State(context.Background(), w.runner(host, ""), "web1")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (w *world) calls() string {
	b, _ := os.ReadFile(filepath.Join(w.dir, "calls.log"))
	return string(b)
}

func TestTeleport(t *testing.T) {
	w := newWorld(t, "FAKEVBOX_STEP=5")
	d := w.driver()
	ctx := context.Background()
	if err := d.PrepareDestination(ctx); err != nil {
		t.Fatal(err)
	}
	if s := w.state(t, "dest"); s != "teleportingin" {
		t.Fatalf("destination %q", s)
	}
	progress := make(chan hypervisor.Progress, 100)
	var inHook string
	res, err := d.Migrate(ctx, hypervisor.Options{Downtime: 250 * time.Millisecond}, progress, func(context.Context) error {
		inHook = w.state(t, "source")
		return nil
	})
	if err != nil {
		t.Fatalf("migrate: %v\ncalls:\n%s", err, w.calls())
	}
	close(progress)
	n := 0
	for p := range progress {
		n++
		if p.Total != 100 || p.Transferred > 100 {
			t.Errorf("progress %+v", p)
		}
	}
	if inHook != "paused" || n < 5 {
		t.Fatalf("source in hook %q (want paused), %d progress reports", inHook, n)
	}
	if s, ds := w.state(t, "source"), w.state(t, "dest"); s != "poweroff" || ds != "running" {
		t.Fatalf("after: source %q, destination %q", s, ds)
	}
	calls := w.calls()
	for _, c := range []string{
		"dest: modifyvm web1 --teleporter on --teleporter-port 6000 --teleporter-address 10.2.0.2 --teleporter-password-file ",
		"dest: startvm web1 --type headless",
		"source: controlvm web1 pause",
		"source: controlvm web1 teleport --host 10.2.0.2 --port 6000 --maxdowntime 250 --passwordfile ",
	} {
		if !strings.Contains(calls, c) {
			t.Errorf("no call %q in:\n%s", c, calls)
		}
	}
	if _, err := os.Stat(filepath.Join(w.dir, "pw", "teleport.password")); !os.IsNotExist(err) {
		t.Errorf("password file left behind")
	}
	if res.Downtime <= 0 {
		t.Errorf("result %+v", res)
	}
	if err := d.ResumeSource(ctx); err == nil || !strings.Contains(err.Error(), "cannot resume") {
		t.Errorf("resume after teleport: %v", err)
	}
}

func TestTeleportFailureResumesSource(t *testing.T) {
	w := newWorld(t, "FAKEVBOX_FAIL=teleport", "FAKEVBOX_STEP=1")
	d := w.driver()
	ctx := context.Background()
	if err := d.PrepareDestination(ctx); err != nil {
		t.Fatal(err)
	}
	_, err := d.Migrate(ctx, hypervisor.Options{Downtime: time.Second}, nil, func(context.Context) error { return nil })
	if !errors.Is(err, hypervisor.ErrDestinationFailed) || !strings.Contains(err.Error(), "connection reset by peer") {
		t.Fatalf("err = %v", err)
	}
	if s := w.state(t, "source"); s != "running" {
		t.Fatalf("source %q after a failed teleport", s)
	}
	if err := d.AbortDestination(ctx); err != nil {
		t.Fatal(err)
	}
	if s := w.state(t, "dest"); s != "poweroff" {
		t.Fatalf("destination %q after abort", s)
	}
}

func TestCancelAndHookFailure(t *testing.T) {
	w := newWorld(t, "FAKEVBOX_STEP=200")
	d := w.driver()
	if err := d.PrepareDestination(context.Background()); err != nil {
		t.Fatal(err)
	}
	_, err := d.Migrate(context.Background(), hypervisor.Options{}, nil, func(context.Context) error { return errors.New("digest mismatch") })
	if !errors.Is(err, hypervisor.ErrSwitchover) || w.state(t, "source") != "running" {
		t.Fatalf("hook failure: err %v, source %q", err, w.state(t, "source"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err = d.Migrate(ctx, hypervisor.Options{}, nil, func(context.Context) error { return nil })
	if !errors.Is(err, hypervisor.ErrCancelled) {
		t.Fatalf("cancel: err %v", err)
	}
	if s := w.state(t, "source"); s != "running" {
		t.Fatalf("source %q after cancel", s)
	}
}

func TestErrorsNameTheCause(t *testing.T) {
	w := newWorld(t)
	w.write("dest", "running") // locked: modifyvm must fail
	err := w.driver().PrepareDestination(context.Background())
	if err == nil || !strings.Contains(err.Error(), "already locked for a session") {
		t.Fatalf("err = %v", err)
	}
	if _, err := State(context.Background(), w.runner("source", ""), "nope"); err == nil || !strings.Contains(err.Error(), "Could not find a registered machine named 'nope'") {
		t.Fatalf("err = %v", err)
	}
}

// showvminfo is VBoxManage 7.0's showvminfo --machinereadable for a VM
// with a SATA disk, an empty DVD drive and two NICs (trimmed).
const showvminfo = `name="web1"
Encryption:     disabled
groups="/"
ostype="Debian (64-bit)"
UUID="9c3e4b2a-1f0d-4e8b-a1c2-3d4e5f607182"
CfgFile="/home/vbox/VirtualBox VMs/web1/web1.vbox"
memory=2048
VMState="running"
VMStateChangeTime="2026-11-30T09:12:44.123000000"
storagecontrollername0="SATA"
storagecontrollertype0="IntelAhci"
"SATA-0-0"="/home/vbox/VirtualBox VMs/web1/web1.vdi"
"SATA-ImageUUID-0-0"="6f1ec3a2-0c4e-4a4c-9a55-1b2f9c1e0d11"
"SATA-1-0"="emptydrive"
"SATA-IsEjected"="off"
"SATA-2-0"="none"
natnet1="nat"
macaddress1="080027A1B2C3"
cableconnected1="on"
nic1="bridged"
bridgeadapter1="enp3s0"
nictype1="virtio"
nic2="none"
macaddress3="0800270A0B0C"
nic3="intnet"
nic4="none"
teleporterenabled="off"
`

func TestParseInfo(t *testing.T) {
	info, err := ParseInfo(showvminfo)
	if err != nil {
		t.Fatal(err)
	}
	want := VMInfo{State: "running",
		NICs: []NIC{{Index: 1, Attachment: "bridged", MAC: "08:00:27:a1:b2:c3", Bridge: "enp3s0"},
			{Index: 3, Attachment: "intnet", MAC: "08:00:27:0a:0b:0c"}},
		Disks: []Disk{{Slot: "SATA-0-0", Path: "/home/vbox/VirtualBox VMs/web1/web1.vdi"}}}
	if fmt.Sprint(info) != fmt.Sprint(want) {
		t.Fatalf("info\n  %+v\nwant\n  %+v", info, want)
	}
	if _, err := ParseInfo(`VMState="running"` + "\nnic1=\"nat\"\nmacaddress1=\"08002\"\n"); err == nil || !strings.Contains(err.Error(), "macaddress1") {
		t.Fatalf("bad MAC: %v", err)
	}
	if _, err := ParseInfo("name=\"x\"\n"); err == nil {
		t.Fatal("no VMState accepted")
	}
}

// TestInfoFromFake: the fake VBoxManage reports a VM's NIC and disk the
// way VirtualBox does, and Info reads them back.
func TestInfoFromFake(t *testing.T) {
	w := newWorld(t)
	b, _ := json.Marshal(map[string]any{"web1": map[string]any{"name": "web1", "state": "running",
		"mac": "080027A1B2C3", "bridge": "enp3s0", "disk": "/srv/vbox/web1.vdi"}})
	os.WriteFile(filepath.Join(w.dir, "source.json"), b, 0o644)
	info, err := Info(context.Background(), w.runner("source", ""), "web1")
	if err != nil {
		t.Fatal(err)
	}
	if info.State != "running" || len(info.NICs) != 1 || info.NICs[0].MAC != "08:00:27:a1:b2:c3" || info.NICs[0].Bridge != "enp3s0" ||
		len(info.Disks) != 1 || info.Disks[0] != (Disk{Slot: "SATA Controller-0-0", Path: "/srv/vbox/web1.vdi"}) {
		t.Fatalf("info %+v", info)
	}
}
