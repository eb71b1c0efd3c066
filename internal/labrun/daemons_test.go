package labrun

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

// daemonLab is a lab with its guest at site A and a vmhopd at each site
// (started with opts).
func daemonLab(t *testing.T, opts ...Option) (*lab.Lab, *lab.VM, *config.Migration) {
	t.Helper()
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartVM(ctx, lab.VMConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitGuest(ctx, vm.IP, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := StartDaemons(ctx, l, opts...); err != nil {
		t.Fatal(err)
	}
	spec, err := config.LoadMigration("../../configs/lab-migration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return l, vm, spec
}

// specYAML is spec as the lab hands it to site A's vmhopd.
func specYAML(t *testing.T, l *lab.Lab, vm *lab.VM, spec *config.Migration) ([]byte, qemu.Machine) {
	t.Helper()
	dm, err := l.MachineFor(lab.VMConfig{Name: vm.Name, Host: lab.SiteB, IP: vm.IP})
	if err != nil {
		t.Fatal(err)
	}
	b, err := config.MarshalMigration(SpecFor(l, vm, dm, spec))
	if err != nil {
		t.Fatal(err)
	}
	return b, dm
}

// TestMigrateThroughDaemons: the main job's path. The spec goes to site
// A's vmhopd, which moves the guest to site B through site B's vmhopd
// (two processes, mutual TLS between them): in-flight echo connections
// keep every byte, the guest is the same boot with nothing lost, the
// disk digests match, DNS is flipped. A second migration of the same VM
// while the first runs is refused and the first completes. Afterwards
// neither daemon keeps a migration's files (secrets, records).
func TestMigrateThroughDaemons(t *testing.T) {
	l, vm, spec := daemonLab(t)
	ctx := context.Background()
	second, _ := specYAML(t, l, vm, spec)
	refused := make(chan error, 1)
	go func() {
		// Once the first migration runs, ask for the same VM again.
		lc := daemon.NewLocalClient(DaemonSocket(l, lab.SiteA))
		for range 200 {
			if st, err := lc.Status(ctx); err == nil && len(st.Migrations) > 0 {
				_, err := lc.Migrate(ctx, second)
				refused <- err
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		refused <- fmt.Errorf("the first migration never showed in vmhopd's list")
	}()
	out, err := Migrate(ctx, l, spec, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	var b strings.Builder
	out.Print(&b)
	t.Logf("outcome:\n%s", b.String())
	if err != nil {
		t.Fatalf("migration through the daemons: exit %d: %v", out.Exit, err)
	}
	if err := <-refused; daemon.CodeOf(err) != daemon.CodeAlreadyExists {
		t.Errorf("second migration of the same VM while one runs: %v, want %s", err, daemon.CodeAlreadyExists)
	}
	if !out.Report.DigestMatch || !out.Guest.OK() || !out.Guest.SameBoot {
		t.Errorf("digest match %v, guest %+v", out.Report.DigestMatch, out.Guest)
	}
	for i, e := range out.Client.Echo {
		if e.Unanswered > 0 || e.Reconnects > 0 || e.Got == 0 {
			t.Errorf("echo connection %d: %d sent, %d answered, %d unanswered, %d reconnects", i+1, e.Sent, e.Got, e.Unanswered, e.Reconnects)
		}
	}
	if len(out.Report.DNSAfter) != 1 || out.Report.DNSAfter[0].Addr != lab.NewIP {
		t.Errorf("dns after: %v, want %s", out.Report.DNSAfter, lab.NewIP)
	}
	if out.Drained <= 0 {
		t.Errorf("drained after %s", out.Drained)
	}
	assertNoMigrationFiles(t, l)
}

// assertNoMigrationFiles fails t if either daemon keeps a migration's
// secrets or an incoming record.
func assertNoMigrationFiles(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, site := range []string{lab.SiteA, lab.SiteB} {
		for _, sub := range []string{"migrations", "incoming"} {
			left, _ := filepath.Glob(filepath.Join(DaemonStateDir(l, site), sub, "*"))
			if len(left) > 0 {
				t.Errorf("vmhopd at %s left %v", site, left)
			}
		}
	}
}

// daemonPid is the pid of site's vmhopd.
func daemonPid(t *testing.T, l *lab.Lab, site string) int {
	t.Helper()
	pids := nsPids(t, l, site, "vmhopd")
	if len(pids) != 1 {
		t.Fatalf("vmhopd processes at %s: %v", site, pids)
	}
	return pids[0]
}

// nsPids are the processes in site's namespace whose program name
// contains prog.
func nsPids(t *testing.T, l *lab.Lab, site, prog string) []int {
	t.Helper()
	all, err := netns.Pids(l.NS(site))
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, p := range all {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
		if err != nil {
			continue
		}
		argv0, _, _ := strings.Cut(string(b), "\x00")
		if strings.Contains(filepath.Base(argv0), prog) {
			out = append(out, p)
		}
	}
	return out
}

// dnsA is the lab's svc name's address as the client's resolver sees it.
func dnsA(t *testing.T, l *lab.Lab) netip.Addr {
	t.Helper()
	m, err := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	for _, rr := range m.Answer {
		if a, ok := rr.(*dns.A); ok {
			ip, _ := netip.AddrFromSlice(a.A)
			return ip.Unmap()
		}
	}
	b, _ := json.Marshal(m.Answer)
	t.Fatalf("no A record for %s: %s", lab.SvcName, b)
	return netip.Addr{}
}

// TestMigrateThroughDaemonsUserspace: the main job's path with both
// vmhopd configured `datapath: userspace` (no BPF on either host): the
// in-flight echo connections keep every byte through the WireGuard
// tunnel, the guest survives, the drain ends; then host A holds nothing
// of the migration and host B only the moved VM's entry (its NAT
// table), no tunnel, no rule, and neither host has a BPF pin. (Its first
// runs lost the destination QEMU to QEMU 7.2's NBD abort at the mirror's
// end, as every migration between two daemons did until the relay
// dropped NBD_CMD_DISC: see storage.discFilter.)
func TestMigrateThroughDaemonsUserspace(t *testing.T) {
	l, _, spec := daemonLab(t, Continuity(migrator.ContinuityUserspace))
	ctx := context.Background()
	out, err := Migrate(ctx, l, spec, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	var b strings.Builder
	out.Print(&b)
	t.Logf("outcome:\n%s", b.String())
	if err != nil {
		t.Fatalf("migration through the daemons in userspace mode: exit %d: %v", out.Exit, err)
	}
	if !out.Report.DigestMatch || !out.Guest.OK() || !out.Guest.SameBoot {
		t.Errorf("digest match %v, guest %+v", out.Report.DigestMatch, out.Guest)
	}
	for i, e := range out.Client.Echo {
		if e.Unanswered > 0 || e.Reconnects > 0 || e.Got == 0 {
			t.Errorf("echo connection %d: %d sent, %d answered, %d unanswered, %d reconnects", i+1, e.Sent, e.Got, e.Unanswered, e.Reconnects)
		}
	}
	if out.Report.Redirected["encap_packets"] == 0 {
		t.Errorf("redirected %v: nothing went through the tunnel", out.Report.Redirected)
	}
	if out.Drained <= 0 {
		t.Errorf("drained after %s", out.Drained)
	}
	for _, c := range []struct {
		site string
		want []string
	}{{lab.SiteA, nil}, {lab.SiteB, []string{"vmhop_vm_10_1_0_10"}}} {
		ts, err := wgpath.Tables(l.NS(c.site))
		if err != nil || !slices.Equal(ts, c.want) {
			t.Errorf("%s: nftables tables %v (%v), want %v", c.site, ts, err, c.want)
		}
		out, _ := netns.Run(ctx, l.NS(c.site), "ip", "-o", "link")
		if strings.Contains(out, "vhwg") {
			t.Errorf("%s: a tunnel is left:\n%s", c.site, out)
		}
		rules, _ := netns.Run(ctx, l.NS(c.site), "ip", "rule")
		if strings.Contains(rules, "fwmark") {
			t.Errorf("%s: a rule is left:\n%s", c.site, rules)
		}
		if ents, err := os.ReadDir(l.PinDir(c.site)); err == nil && len(ents) > 0 {
			t.Errorf("%s: BPF pins in userspace mode: %v", c.site, ents)
		}
	}
	assertNoMigrationFiles(t, l)
}
