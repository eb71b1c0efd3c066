package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

// fakeClock is the leases' clock, moved by the test.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// statusIncoming is a destination QEMU whose query-status says status.
type statusIncoming struct {
	fakeIncoming
	status string
}

func (f *statusIncoming) Query(_ context.Context, req qemu.Query) (json.RawMessage, error) {
	f.note(req.Command)
	return json.Marshal(map[string]any{"status": f.status, "running": f.status == "running"})
}

// TestLeaseExpiry: site-b, the destination, holds what site-a's calls
// made (an image, the destination QEMU) in site-a's lease. While site-a
// keeps calling (a hello is enough) nothing happens; once it is silent
// for the TTL, site-b stops its QEMU (still waiting for the stream) and
// removes the image. A destination whose QEMU has the VM running keeps
// everything.
func TestLeaseExpiry(t *testing.T) {
	for _, c := range []struct {
		status  string
		cleaned bool
	}{{"inmigrate", true}, {"running", false}} {
		t.Run(c.status, func(t *testing.T) {
			clock := &fakeClock{t: time.Unix(1e9, 0)}
			ca := newTestCA(t)
			in := &statusIncoming{fakeIncoming: fakeIncoming{exited: make(chan struct{})}, status: c.status}
			b := start(t, ca.config(t, "site-b", "site-a=127.0.0.1:1"), Options{Now: clock.now, LeaseTTL: time.Minute, PeerCheckInterval: -1},
				func(a *PeerAPI) {
					ServeDestination(a, &migrator.Host{Name: "site-b"})
					ServeIncoming(a, in)
				})
			a, err := New(ca.config(t, "site-a", "site-b="+b.PeerAddr().String()), Options{})
			if err != nil {
				t.Fatal(err)
			}
			peer, _ := a.Peer("site-b")
			ctx := context.Background()
			img := filepath.Join(t.TempDir(), "web1.raw")
			if err := (RemoteDestination{Peer: peer}).CreateImage(ctx, migrator.ImageCreate{Path: img, Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			if err := call(ctx, peer, MethodQEMUStart, qemu.IncomingStart{Name: "web1"}); err != nil {
				t.Fatal(err)
			}
			ls := b.Leases()
			if len(ls) != 1 || ls[0].Peer != "site-a" || len(ls[0].Images) != 1 || len(ls[0].Incoming) != 1 {
				t.Fatalf("leases: %+v", ls)
			}
			// A greeting renews the lease: 40 s + 40 s with one in between.
			clock.add(40 * time.Second)
			if _, err := peer.Hello(ctx, a.hello()); err != nil {
				t.Fatal(err)
			}
			clock.add(40 * time.Second)
			if got := b.peerAPI.expireLeases(ctx); len(got) != 0 {
				t.Fatalf("a renewed lease expired: %v", got)
			}
			if _, err := os.Stat(img); err != nil {
				t.Fatalf("image removed early: %v", err)
			}
			clock.add(30 * time.Second)
			got := b.peerAPI.expireLeases(ctx)
			if _, ok := got["site-a"]; !ok {
				t.Fatalf("lease did not expire: %v", got)
			}
			_, statErr := os.Stat(img)
			in.mu.Lock()
			calls := append([]string(nil), in.calls...)
			in.mu.Unlock()
			stopped := len(calls) > 0 && calls[len(calls)-1] == "stop"
			if c.cleaned {
				if got["site-a"] != nil || !errors.Is(statErr, os.ErrNotExist) || !stopped {
					t.Fatalf("after expiry: %v, image %v, qemu calls %v", got["site-a"], statErr, calls)
				}
			} else if !errors.Is(got["site-a"], errCommitted) || statErr != nil || stopped {
				t.Fatalf("a running VM's destination was touched: %v, image %v, qemu calls %v", got["site-a"], statErr, calls)
			}
			if len(b.Leases()) != 0 {
				t.Errorf("lease kept after expiry: %+v", b.Leases())
			}
		})
	}
}

// TestLeaseEndsWithTheSourcesUndo: a source that undoes its own work
// (dest.abort, qemu.stop, dest.retire-tunnel) leaves no lease behind.
func TestLeaseEndsWithTheSourcesUndo(t *testing.T) {
	l := newLeases(time.Minute, nil, nil)
	tun := migrator.Tunnel{Token: 7}
	l.track("a", func(ls *Lease) { ls.Tunnels = append(ls.Tunnels, tun); ls.Images = append(ls.Images, "/x.raw") })
	l.track("a", func(ls *Lease) { ls.Incoming = []string{"m1"} })
	if len(l.List()) != 1 {
		t.Fatal("no lease")
	}
	l.track("a", func(ls *Lease) { ls.Incoming = nil })
	l.track("a", func(ls *Lease) { ls.Images = nil })
	l.track("a", func(ls *Lease) { ls.Tunnels = nil })
	if len(l.List()) != 0 {
		t.Fatalf("lease left: %+v", l.List())
	}
	l.touch("b") // no lease: nothing made
	if len(l.List()) != 0 {
		t.Fatal("touch made a lease")
	}
}

// TestNoSpaceCrossesThePeerAPI: a destination without room for the image
// refuses it as storage.ErrNoSpace on the source's side, naming the
// destination host and the path.
func TestNoSpaceCrossesThePeerAPI(t *testing.T) {
	dest := RemoteDestination{Peer: hostsPair(t)}
	img := filepath.Join(t.TempDir(), "web1.raw")
	err := dest.CreateImage(context.Background(), migrator.ImageCreate{Path: img, Size: 1 << 60})
	if !errors.Is(err, storage.ErrNoSpace) || !strings.Contains(err.Error(), "site-b") || !strings.Contains(err.Error(), img) {
		t.Fatalf("err = %v", err)
	}
}
