package daemon

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

// TestPortPool: reservations get distinct ports of the range, skipping
// ports something else holds; the same migration gets its own ports
// again; a released migration's ports go to the next one; the range
// exhausted is a clear error naming the key.
func TestPortPool(t *testing.T) {
	p := &portPool{rng: config.PortRange{Min: 50000, Max: 50009}, free: func(port uint16) bool { return port != 50001 }}
	a, err := p.reserve("site-a/m1")
	if err != nil || a != (MigrationPorts{50000, 50002, 50003, 50004}) {
		t.Fatalf("first: %+v, %v", a, err)
	}
	b, err := p.reserve("site-a/m2")
	if err != nil || b != (MigrationPorts{50005, 50006, 50007, 50008}) {
		t.Fatalf("second: %+v, %v", b, err)
	}
	if again, err := p.reserve("site-a/m1"); err != nil || again != a {
		t.Fatalf("again: %+v, %v; want %+v", again, err, a)
	}
	_, err = p.reserve("site-a/m3")
	if CodeOf(err) != CodeUnavailable || !strings.Contains(err.Error(), "vmhopd.migration_ports 50000-50009 has no 4 free ports") ||
		!strings.Contains(err.Error(), "8 held by 2 incoming migrations, 1 taken by other programs") {
		t.Fatalf("exhausted: %v", err)
	}
	if n := p.release("site-a/m1"); n != 4 || p.inUse() != 4 {
		t.Fatalf("release: %d, in use %d", n, p.inUse())
	}
	if c, err := p.reserve("site-a/m3"); err != nil || c != a {
		t.Fatalf("after release: %+v, %v; want %+v", c, err, a)
	}
}

// TestConcurrentIncomingOverPeerAPI: two migrations from one source to
// one destination, told apart by their ID: each reserves its own ports
// (the reply of incoming.reserve), neither may listen on the other's,
// the lease holds both, a release frees its ports, and a source that
// vanishes has the rest released by its lease's expiry.
func TestConcurrentIncomingOverPeerAPI(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	ca := newTestCA(t)
	w := &HostWork{Host: &migrator.Host{Name: "site-b"}, Disks: &storage.LocalDiskServer{}, StateDir: t.TempDir(),
		Ports: config.PortRange{Min: 50000, Max: 50010}, PortFree: func(uint16) bool { return true }}
	b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{Now: clock.now, LeaseTTL: time.Minute, PeerCheckInterval: -1}, w.Register)
	a, err := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
	if err != nil {
		t.Fatal(err)
	}
	peer, _ := a.Peer("site-b")
	ctx := context.Background()
	m1, m2, m3 := &RemoteIncoming{Peer: peer.ForMigration("m1")}, &RemoteIncoming{Peer: peer.ForMigration("m2")}, &RemoteIncoming{Peer: peer.ForMigration("m3")}
	p1, err := m1.Reserve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := m2.Reserve(ctx)
	if err != nil {
		t.Fatal(err)
	}
	all := append(p1.list(), p2.list()...)
	slices.Sort(all)
	if len(slices.Compact(all)) != 8 || all[0] < 50000 || all[7] > 50010 {
		t.Fatalf("ports %+v and %+v: want 8 distinct ports of the range", p1, p2)
	}
	if _, err := m3.Reserve(ctx); CodeOf(err) != CodeUnavailable || !strings.Contains(err.Error(), "vmhopd.migration_ports 50000-50010") {
		t.Fatalf("a third migration in a range for two: %v", err)
	}
	// Neither migration listens on the other's ports, nor before reserving.
	wan := netip.MustParseAddr("127.0.0.1")
	if err := (RemoteDiskServer{Peer: m2.Peer}).ServeRelay(ctx, storage.RelayServe{Listen: netip.AddrPortFrom(wan, p1.Relay).String(),
		NBD: netip.AddrPortFrom(wan, p2.NBD).String()}); CodeOf(err) != CodePermissionDenied {
		t.Errorf("m2's relay on m1's port: %v, want permission_denied", err)
	}
	if err := (RemoteDiskServer{Peer: peer.ForMigration("m9")}).ServeChunked(ctx, storage.ChunkedServe{Listen: netip.AddrPortFrom(wan, p1.Chunked).String()}); CodeOf(err) != CodeFailedPrecondition {
		t.Errorf("a chunked end without a reservation: %v, want failed_precondition", err)
	}
	if err := m1.Start(ctx, qemu.IncomingStart{Name: "web1", Listen: netip.AddrPortFrom(wan, p2.Memory)}); CodeOf(err) != CodePermissionDenied {
		t.Errorf("m1's stream on m2's port: %v, want permission_denied", err)
	}
	if ls := b.Leases(); len(ls) != 1 || !slices.Equal(ls[0].Reserved, []string{"m1", "m2"}) {
		t.Fatalf("leases: %+v", ls)
	}
	// m1 ends: its ports come back, and m3 gets them.
	if err := m1.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if w.PortsInUse() != 4 {
		t.Fatalf("after m1's release %d ports held, want 4", w.PortsInUse())
	}
	p3, err := m3.Reserve(ctx)
	if err != nil || p3 != p1 {
		t.Fatalf("m3 after m1's release: %+v, %v; want m1's %+v", p3, err, p1)
	}
	// The source vanishes: its lease expires and releases m2 and m3.
	clock.add(2 * time.Minute)
	b.peerAPI.expireLeases(ctx)
	if w.PortsInUse() != 0 || len(b.Leases()) != 0 {
		t.Fatalf("after expiry: %d ports held, leases %+v", w.PortsInUse(), b.Leases())
	}
}
