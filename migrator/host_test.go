package migrator

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator/storage"
)

// TestHostCallsAreJSON: every argument and result of SourceHost and
// Destination survives a JSON round trip unchanged, so a peer channel
// can carry the calls as they are.
func TestHostCallsAreJSON(t *testing.T) {
	a, b := netip.MustParseAddr("10.1.0.10"), netip.MustParseAddr("10.2.0.10")
	tb, ta := Tunnel{Peer: b, Token: 0xfeedf00d12345678}, Tunnel{Peer: a, Token: 0xfeedf00d12345678}
	for _, v := range []any{
		&SourcePrepare{Tunnel: tb, OldIP: a, MAC: "52:54:00:12:34:56"},
		&RedirectSwitch{OldIP: a, Tunnel: tb, MAC: "52:54:00:12:34:56", On: true},
		&RedirectRemove{OldIP: a},
		&RedirectQuery{OldIP: a},
		&RedirectState{Counters: map[string]uint64{"encap_packets": 7}, Idle: 1500 * time.Millisecond, Seen: true},
		&ImageRef{Path: "/var/lib/vmhop/web1.raw"},
		&ImageInfo{Size: 1 << 30},
		&ImageCreate{Path: "/var/lib/vmhop/web1.raw", Size: 1 << 30},
		&DestPrepare{Tunnel: ta},
		&ta,
		&VMAttach{Tap: "tap-web1", OldIP: a, NewIP: b, Gateway: netip.MustParseAddr("10.1.0.1"),
			GatewayMAC: "52:54:00:00:00:01", MAC: "52:54:00:12:34:56", Tunnel: ta},
		&VMAttach{Tap: "tap-web1", OldIP: a, NewIP: b}, // drained: no peer
		&HashRequest{Path: "/x.raw", Chunks: []int64{0, 7}},
		&Digests{Root: []byte{1, 2, 3}, Read: 1 << 20},
		&DestAbort{OldIP: a, NewIP: b, Image: "/x.raw"},
		&AddrQuery{},
		&HeldAddrs{Name: "host B", Addrs: []netip.Addr{b, netip.MustParseAddr("fe80::1")}},
	} {
		j, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("%T: %v", v, err)
		}
		back := reflect.New(reflect.TypeOf(v).Elem()).Interface()
		if err := json.Unmarshal(j, back); err != nil {
			t.Fatalf("%T from %s: %v", v, j, err)
		}
		if !reflect.DeepEqual(v, back) {
			t.Errorf("%T: %s came back as %+v", v, j, back)
		}
	}
}

// TestCreateImageNoSpace: an image the destination's filesystem has no
// room for is refused before anything is made, naming the host, the path
// and both sizes (storage.ErrNoSpace).
func TestCreateImageNoSpace(t *testing.T) {
	orig := freeBytes
	freeBytes = func(string) (int64, error) { return 100 << 20, nil }
	t.Cleanup(func() { freeBytes = orig })
	h := &Host{Name: "site-b"}
	img := filepath.Join(t.TempDir(), "web1.raw")
	err := h.CreateImage(context.Background(), ImageCreate{Path: img, Size: 1 << 30, Need: 300 << 20})
	if !errors.Is(err, storage.ErrNoSpace) || !strings.Contains(err.Error(), "site-b") || !strings.Contains(err.Error(), img) ||
		!strings.Contains(err.Error(), "needs 300 MiB") || !strings.Contains(err.Error(), "100 MiB free") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("image made anyway: %v", err)
	}
	// Enough room for what the copy writes (a sparse image): made.
	if err := h.CreateImage(context.Background(), ImageCreate{Path: img, Size: 1 << 30, Need: 50 << 20}); err != nil {
		t.Fatal(err)
	}
}

// TestHeldAddrsReportsHostReadiness: besides its addresses a host says
// which continuity mechanism it has loaded and, when asked about an
// image directory, the free space there (the dry run's preflight).
func TestHeldAddrsReportsHostReadiness(t *testing.T) {
	orig := freeBytes
	freeBytes = func(string) (int64, error) { return 100 << 20, nil }
	t.Cleanup(func() { freeBytes = orig })
	ctx := context.Background()
	h, err := (&Host{Name: "site-b", Continuity: ContinuityUserspace}).HeldAddrs(ctx, AddrQuery{ImageDir: t.TempDir()})
	if err != nil || h.Continuity != ContinuityUserspace || h.FreeBytes != 100<<20 || len(h.Addrs) == 0 {
		t.Fatalf("held: %+v %v", h, err)
	}
	if h, err := (&Host{Name: "site-a"}).HeldAddrs(ctx, AddrQuery{}); err != nil || h.Continuity != "" || h.FreeBytes != 0 {
		t.Fatalf("no datapath loaded, no image dir asked: %+v %v", h, err)
	}
}
