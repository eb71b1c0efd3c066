package labrun

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
)

// TestTwoVMsAtOnce: two VMs (vm with svc.example., vm2 with
// svc2.example.; 256 MiB disks with 64 MiB of data each) move from site
// A to site B at the same time through the two vmhopd: two jobs handed
// to site A's vmhopd together, site B's vmhopd serving both incoming
// migrations on ports of its own from migration_ports. Each VM then runs
// at site B exactly once (one QEMU, QMP says running), is the same boot
// with its RAM and disk records intact, its disk digests match, its
// echo connections kept every byte, and its DNS name points at its new
// address; the two moves overlapped; nothing listens in the port range
// any more, no QEMU is left at site A, neither daemon keeps a secret or
// an incoming record.
func TestTwoVMsAtOnce(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm1, err := l.StartVM(ctx, lab.VMConfig{DiskSize: 256 * units.MiB, Prefill: 64 * units.MiB})
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := l.StartVM(ctx, SecondVM(128, 256*units.MiB, 64*units.MiB))
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []*lab.VM{vm1, vm2} {
		if err := l.WaitGuest(ctx, vm.IP, 120*time.Second); err != nil {
			t.Fatalf("%s: %v", vm.Name, err)
		}
	}
	if err := StartDaemons(ctx, l); err != nil {
		t.Fatal(err)
	}
	var specs []*config.Migration
	for _, f := range []string{"../../configs/lab-migration.yaml", "../../configs/lab-migration-vm2.yaml"} {
		s, err := config.LoadMigration(f)
		if err != nil {
			t.Fatal(err)
		}
		specs = append(specs, s)
	}

	// A light load (two TCG guests and their clients share the lab
	// machine's CPUs: the standard load on both stretched the memory
	// phase to 3m20s on a busy 2-core host, 57 s on a quiet one): vm two
	// echo connections at 50 Hz, a new HTTP connection by name every
	// 200 ms, pings every 20 ms; vm2 one echo connection and pings.
	moves := []Move{
		{VM: vm1, Spec: specs[0], Shape: &Load{Conns: 2, EchoEvery: 20 * time.Millisecond, HTTPEvery: 200 * time.Millisecond, PingEvery: 20 * time.Millisecond}},
		{VM: vm2, Spec: specs[1], Shape: &Load{Conns: 1, EchoEvery: 20 * time.Millisecond, HTTPEvery: -1, PingEvery: 20 * time.Millisecond}},
	}
	outs, err := MigrateConcurrent(ctx, l, moves, "", slog.New(slog.NewTextHandler(os.Stderr, nil)))
	for i, o := range outs {
		var b strings.Builder
		o.Print(&b)
		t.Logf("%s outcome:\n%s", moves[i].VM.Name, b.String())
	}
	if err != nil {
		t.Fatalf("two migrations at once: %v", err)
	}
	for i, o := range outs {
		name := moves[i].VM.Name
		if !o.Report.DigestMatch || !o.Guest.OK() || !o.Guest.SameBoot || o.Guest.MemCycles < 2 {
			t.Errorf("%s: digest match %v, guest %+v", name, o.Report.DigestMatch, o.Guest)
		}
		for k, e := range o.Client.Echo {
			if e.Unanswered > 0 || e.Reconnects > 0 || e.Got == 0 {
				t.Errorf("%s: echo connection %d: %d sent, %d answered, %d unanswered, %d reconnects", name, k+1, e.Sent, e.Got, e.Unanswered, e.Reconnects)
			}
		}
		if want := moves[i].Spec.Network.NewIP; dnsAOf(t, l, moves[i].Spec.DNS.Name) != want {
			t.Errorf("%s: DNS %s does not point at %s", name, moves[i].Spec.DNS.Name, want)
		}
		if o.Drained <= 0 {
			t.Errorf("%s: drained after %s", name, o.Drained)
		}
	}
	// The moves overlapped: each started before the other ended.
	end0, end1 := outs[0].Start.Add(outs[0].Report.Total), outs[1].Start.Add(outs[1].Report.Total)
	if !outs[0].Start.Before(end1) || !outs[1].Start.Before(end0) {
		t.Errorf("the migrations did not overlap: %s +%s and %s +%s", outs[0].Start, outs[0].Report.Total, outs[1].Start, outs[1].Report.Total)
	}
	// Site B gave each its own ports, and released both.
	logB, _ := os.ReadFile(l.Path("vmhopd-" + lab.SiteB + ".log"))
	reserved := regexp.MustCompile(`ports reserved.*? memory=(\d+)`).FindAllSubmatch(logB, -1)
	released := strings.Count(string(logB), "incoming migration: ports released")
	if len(reserved) != 2 || string(reserved[0][1]) == string(reserved[1][1]) || released != 2 {
		t.Errorf("site B's vmhopd: %d reservations (%q), %d releases; want 2 on distinct ports, 2 releases", len(reserved), reserved, released)
	}
	// Each VM runs at site B exactly once; nothing of them at site A.
	for _, vm := range []*lab.VM{vm1, vm2} {
		dm, err := l.MachineFor(lab.VMConfig{Name: vm.Name, Host: lab.SiteB, IP: vm.IP})
		if err != nil {
			t.Fatal(err)
		}
		if n := qemuCount(t, l, lab.SiteB, dm.QMPSocket); n != 1 {
			t.Errorf("%s: %d QEMU at site B, want 1", vm.Name, n)
		}
		if n := qemuCount(t, l, lab.SiteA, vm.Machine.QMPSocket); n != 0 {
			t.Errorf("%s: %d QEMU left at site A", vm.Name, n)
		}
		if st := qmpStatus(t, dm.QMPSocket); st != "running" {
			t.Errorf("%s at site B: QMP status %q, want running", vm.Name, st)
		}
		if out, err := netns.Run(ctx, l.NS(lab.SiteB), "ip", "link", "show", dm.Tap); err != nil {
			t.Errorf("%s: its tap %s at site B: %v %s", vm.Name, dm.Tap, err, out)
		}
	}
	for _, site := range []string{lab.SiteA, lab.SiteB} {
		out, err := netns.Run(ctx, l.NS(site), "ss", "-Hltn")
		if err != nil {
			t.Errorf("ss at %s: %v", site, err)
		} else if left := ListenersInRange(out, MigrationPorts); len(left) > 0 {
			t.Errorf("%s listens on ports of vmhopd.migration_ports %s:\n%s", site, MigrationPorts, strings.Join(left, "\n"))
		}
	}
	assertNoMigrationFiles(t, l)
}

// TestSecondSpecMatchesFile: configs/lab-migration-vm2.yaml says what
// SecondSpec derives from configs/lab-migration.yaml (the benchmark's
// way to the second VM's spec).
func TestSecondSpecMatchesFile(t *testing.T) {
	first, err := config.LoadMigration("../../configs/lab-migration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	second, err := config.LoadMigration("../../configs/lab-migration-vm2.yaml")
	if err != nil {
		t.Fatal(err)
	}
	d := SecondSpec(first)
	if d.Network != second.Network || d.DNS != second.DNS || d.Limits != second.Limits || d.Storage != second.Storage {
		t.Errorf("configs/lab-migration-vm2.yaml: %+v %+v; SecondSpec: %+v %+v", second.Network, second.DNS, d.Network, d.DNS)
	}
}

// qemuCount is how many QEMU processes in site's namespace serve QMP on
// sock (one VM's).
func qemuCount(t *testing.T, l *lab.Lab, site, sock string) int {
	t.Helper()
	n := 0
	for _, pid := range nsPids(t, l, site, "qemu") {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if strings.Contains(string(b), sock+",") || strings.Contains(string(b), sock+"\x00") {
			n++
		}
	}
	return n
}

// qmpStatus is the status QEMU's query-status gives on sock.
func qmpStatus(t *testing.T, sock string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mon, err := qemu.Dial(ctx, sock)
	if err != nil {
		t.Errorf("QMP %s: %v", sock, err)
		return ""
	}
	defer mon.Close()
	var st struct {
		Status string `json:"status"`
	}
	if err := mon.Execute(ctx, "query-status", nil, &st); err != nil {
		t.Errorf("QMP %s: query-status: %v", sock, err)
	}
	return st.Status
}

// dnsAOf is name's address as the client's resolver sees it.
func dnsAOf(t *testing.T, l *lab.Lab, name string) netip.Addr {
	t.Helper()
	m, err := l.QueryDNS(lab.Client, name, dns.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	for _, rr := range m.Answer {
		if a, ok := rr.(*dns.A); ok {
			ip, _ := netip.AddrFromSlice(a.A)
			return ip.Unmap()
		}
	}
	t.Errorf("no A record for %s", name)
	return netip.Addr{}
}
