package migrator

import (
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

// TestContinuityModes: a host refuses an unknown mode and a peer of the
// other mode before it touches anything, and a userspace tunnel needs the
// peer's key and port.
func TestContinuityModes(t *testing.T) {
	ctx := context.Background()
	bogus := &Host{Name: "host B", Continuity: "kernel-wg"}
	if _, err := bogus.PrepareDestination(ctx, DestPrepare{Tunnel: Tunnel{Token: 1}}); err == nil ||
		!strings.Contains(err.Error(), `continuity "kernel-wg"`) {
		t.Errorf("unknown mode: %v", err)
	}
	us := &Host{Name: "host A", Continuity: ContinuityUserspace}
	req := SourcePrepare{Tunnel: Tunnel{Peer: netip.MustParseAddr("192.0.2.2"), Token: 1, Continuity: ContinuityEBPF},
		OldIP: netip.MustParseAddr("10.1.0.10"), MAC: "52:54:00:00:00:01"}
	if _, err := us.PrepareSource(ctx, req); err == nil || !strings.Contains(err.Error(), "both hosts must use the same") {
		t.Errorf("userspace source, eBPF destination: %v", err)
	}
	req.Tunnel.Continuity = ContinuityUserspace
	if _, err := us.PrepareSource(ctx, req); err == nil || !strings.Contains(err.Error(), "want 32 bytes") {
		t.Errorf("userspace source, destination without a key: %v", err)
	}
	req.Tunnel.Key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	if _, err := us.PrepareSource(ctx, req); err == nil || !strings.Contains(err.Error(), "no WireGuard port") {
		t.Errorf("userspace source, destination without a port: %v", err)
	}
	if us.wg != nil {
		t.Error("a refused prepare made the userspace path")
	}
	ebpf := &Host{Name: "host B"}
	if err := ebpf.checkPeer(Tunnel{Continuity: ContinuityUserspace}); err == nil {
		t.Error("eBPF host accepted a userspace peer")
	}
	if err := ebpf.checkPeer(Tunnel{}); err != nil {
		t.Errorf("a peer of unknown mode (an older daemon, the drain) refused: %v", err)
	}
}

// TestTunnelEndJSON: the tunnel's ends cross the peer API with
// snake_case keys, and an older peer's empty answer reads as eBPF.
func TestTunnelEndJSON(t *testing.T) {
	b, _ := json.Marshal(Tunnel{Peer: netip.MustParseAddr("192.0.2.1"), Token: 7, Continuity: "userspace", Key: "k", Port: 51820})
	if string(b) != `{"peer":"192.0.2.1","token":7,"continuity":"userspace","key":"k","port":51820}` {
		t.Errorf("tunnel: %s", b)
	}
	var end TunnelEnd
	if err := json.Unmarshal([]byte(`{}`), &end); err != nil || end.Continuity != "" {
		t.Fatalf("empty answer: %+v %v", end, err)
	}
	if err := (&Host{}).checkPeer(Tunnel{Continuity: end.Continuity}); err != nil {
		t.Errorf("an older peer's empty answer refused: %v", err)
	}
}
