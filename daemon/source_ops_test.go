package daemon

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/storage"
)

// TestRecoveryPlanFromTheJournal: a record past its commit point whose
// source VM cannot be adopted again gets a plan from the spec and the
// journal (the peer, the addresses, the MACs it kept, DNS); before the
// commit point so does one whose source QEMU is gone (its QMP socket
// missing: recovery rolls back without it), while one whose socket still
// listens keeps the plan's error (the recovery is retried); a spec that
// does not parse is said.
func TestRecoveryPlanFromTheJournal(t *testing.T) {
	ca := newTestCA(t)
	cfg := ca.config(t, "site-a", "site-b=10.2.0.2:7710")
	d, err := New(cfg, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := &SourceMigrator{D: d, Work: &HostWork{Host: &migrator.Host{Name: "site-a"}}}
	key := filepath.Join(t.TempDir(), "tsig.key")
	os.WriteFile(key, []byte(`key "vmhop." { algorithm hmac-sha256; secret "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"; };`+"\n"), 0o600)
	spec := strings.Replace(string(readSpec(t)), "/etc/vmhop/tsig.key", key, 1)
	rec := &journal.Record{ID: "web1-0000abcd", Spec: spec, VMMAC: "52:54:00:12:34:56", GatewayMAC: "52:54:00:00:00:01"}
	rec.Done.Committed = true
	p, cleanup, err := s.RecoveryPlan(context.Background(), rec)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	if p.Label != "site-b" || p.VMMAC.String() != rec.VMMAC || p.GatewayMAC.String() != rec.GatewayMAC || p.DNS == nil ||
		p.OldIP.String() != "10.1.0.10" || p.DestWAN.String() != "10.2.0.2" || p.Driver == nil {
		t.Fatalf("plan from the journal: %+v", p)
	}
	rec.Done.Committed = false
	p, cleanup2, err := s.RecoveryPlan(context.Background(), rec)
	if err != nil {
		t.Fatalf("before the commit point, the source VM gone: %v", err)
	}
	defer cleanup2()
	if p.SourceDisk != "/var/lib/vmhop/web1.raw" || p.Label != "site-b" || p.Driver == nil {
		t.Fatalf("plan from the journal, the source VM gone: %+v", p)
	}
	sock := filepath.Join(t.TempDir(), "web1.qmp")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rec.Spec = strings.Replace(spec, "/run/vmhop/web1.qmp", sock, 1)
	if _, _, err := s.RecoveryPlan(context.Background(), rec); err == nil || !strings.Contains(err.Error(), "migration.source.address") {
		t.Fatalf("before the commit point, the source VM there: %v", err)
	}
	rec.Spec = "nonsense: ["
	if _, _, err := s.RecoveryPlan(context.Background(), rec); err == nil || !strings.Contains(err.Error(), "does not parse") {
		t.Fatalf("bad spec: %v", err)
	}
}

// TestPreflightHostsReady: the dry run's look at both hosts beyond
// addresses: each reports its continuity mechanism and the destination
// its free space where the image goes; a host with neither eBPF nor the
// userspace fallback loaded, or a destination without room for the
// source's allocated bytes (storage.ErrNoSpace, naming host and path),
// fails the preflight.
func TestPreflightHostsReady(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	src := &migrator.Host{Name: "site-a", Continuity: migrator.ContinuityUserspace}
	dst := &migrator.Host{Name: "site-b", Continuity: migrator.ContinuityUserspace}
	p := &migrator.Plan{Source: src, Dest: dst, DestDisk: filepath.Join(dir, "web1.raw")}
	rep := &PreflightReport{ImageBytes: 1 << 30, AllocBytes: 1 << 20}
	if err := hostsReady(ctx, p, rep); err != nil {
		t.Fatal(err)
	}
	if rep.SourceContinuity != "userspace" || rep.DestContinuity != "userspace" || rep.DestFreeBytes < 1<<20 {
		t.Fatalf("report: %+v", rep)
	}
	rep.AllocBytes = 1 << 62
	if err := hostsReady(ctx, p, rep); !errors.Is(err, storage.ErrNoSpace) || !strings.Contains(err.Error(), "site-b") || !strings.Contains(err.Error(), dir) {
		t.Fatalf("no room at the destination: %v", err)
	}
	rep.AllocBytes = 1 << 20
	p.Dest = &migrator.Host{Name: "site-b"} // no datapath loaded, no fallback
	if err := hostsReady(ctx, p, rep); err == nil || !strings.Contains(err.Error(), "site-b has neither") {
		t.Fatalf("no continuity at the destination: %v", err)
	}
}
