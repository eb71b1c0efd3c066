package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
)

// Leases are the destination side of a migration's life: what each
// source peer's calls made on this host (the peer methods of
// ServeDestination and ServeIncoming record it: tunnels, VM entries,
// images, the destination QEMU), held as long as that peer keeps calling.
// Every authenticated call from the peer renews its lease (the source's
// vmhopd greets its peers every PeerCheckInterval, 30 s by default, so a
// live source renews it even during a long disk copy). A lease not
// renewed for its TTL means the source vanished (its vmhopd died and did
// not come back, or the WAN is cut): the destination then undoes what
// the lease holds, unless the VM already runs here (committed: its
// destination QEMU says so, or WaitRunning succeeded), which is kept.
type Leases struct {
	ttl time.Duration
	now func() time.Time
	log *slog.Logger

	mu     sync.Mutex
	byPeer map[string]*Lease
}

// Lease is what one source peer's migrations made on this host.
type Lease struct {
	Peer    string              `json:"peer"`
	Renewed time.Time           `json:"renewed"`
	Tunnels []migrator.Tunnel   `json:"tunnels,omitempty"` // accepted by dest.prepare
	VMs     []migrator.VMAttach `json:"vms,omitempty"`     // entries made by dest.attach-vm
	Images  []string            `json:"images,omitempty"`  // made by dest.create-image
	// Reserved are the migrations (their IDs) that hold ports here
	// (incoming.reserve): expiry releases them.
	Reserved []string `json:"reserved,omitempty"`
	// Incoming are the migrations whose destination QEMU qemu.start
	// started (and qemu.stop did not stop).
	Incoming []string `json:"incoming,omitempty"`
	// Committed are those of them whose VM runs here (qemu.wait-running
	// succeeded). One committed migration makes expiry keep the VM
	// entries, images and tunnels of the peer: they are not told apart
	// by migration, and a running VM is never undone.
	Committed []string `json:"committed,omitempty"`
}

// DefaultLeaseTTL is Options.LeaseTTL's default: four missed greetings at
// the default PeerCheckInterval.
const DefaultLeaseTTL = 2 * time.Minute

func newLeases(ttl time.Duration, now func() time.Time, log *slog.Logger) *Leases {
	if ttl <= 0 {
		ttl = DefaultLeaseTTL
	}
	if now == nil {
		now = time.Now
	}
	if log == nil {
		log = slog.Default()
	}
	return &Leases{ttl: ttl, now: now, log: log, byPeer: map[string]*Lease{}}
}

// touch renews peer's lease, if it has one.
func (l *Leases) touch(peer string) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if ls := l.byPeer[peer]; ls != nil {
		ls.Renewed = l.now()
	}
}

// track renews peer's lease (made if missing) and lets fn change it; a
// lease fn leaves empty is dropped.
func (l *Leases) track(peer string, fn func(*Lease)) {
	if l == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	ls := l.byPeer[peer]
	if ls == nil {
		ls = &Lease{Peer: peer}
		l.byPeer[peer] = ls
	}
	ls.Renewed = l.now()
	fn(ls)
	if len(ls.Tunnels) == 0 && len(ls.VMs) == 0 && len(ls.Images) == 0 && len(ls.Incoming) == 0 && len(ls.Reserved) == 0 {
		delete(l.byPeer, peer)
	}
}

// List is every lease held, by peer name.
func (l *Leases) List() []Lease {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Lease
	for _, ls := range l.byPeer {
		out = append(out, *ls)
	}
	slices.SortFunc(out, func(a, b Lease) int { return compareStrings(a.Peer, b.Peer) })
	return out
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// takeExpired removes and returns the leases not renewed for the TTL.
func (l *Leases) takeExpired() []Lease {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Lease
	for p, ls := range l.byPeer {
		if l.now().Sub(ls.Renewed) >= l.ttl {
			out = append(out, *ls)
			delete(l.byPeer, p)
		}
	}
	return out
}

// expire cleans up after every expired lease through dest and in (either
// may be nil: not served here) and returns what it did, per peer.
func (l *Leases) expire(ctx context.Context, dest migrator.Destination, in qemu.Incoming) map[string]error {
	out := map[string]error{}
	for _, ls := range l.takeExpired() {
		err := cleanLease(ctx, ls, dest, in)
		out[ls.Peer] = err
		if errors.Is(err, errCommitted) {
			l.log.Warn("lease expired: the source vanished after the VM resumed here; it is kept", "peer", ls.Peer)
			continue
		}
		l.log.Warn("lease expired: the source vanished; its migration's destination was undone",
			"peer", ls.Peer, "images", ls.Images, "vms", len(ls.VMs), "tunnels", len(ls.Tunnels), "err", err)
	}
	return out
}

// errCommitted says an expired lease was kept: the VM runs here.
var errCommitted = errors.New("the VM runs here: kept")

// cleanLease undoes what ls holds, unless a VM of it runs here: each
// destination QEMU still waiting for (or receiving) the stream is
// stopped, the reserved ports are released (through in, if it releases:
// HostWork's incomings), then the VM entries and images are removed and
// the tunnels retired.
func cleanLease(ctx context.Context, ls Lease, dest migrator.Destination, in qemu.Incoming) error {
	var errs []error
	committed := len(ls.Committed) > 0
	if in != nil {
		for _, id := range ls.Incoming {
			if slices.Contains(ls.Committed, id) {
				continue
			}
			mctx := asPeer(ctx, ls.Peer, id)
			raw, err := in.Query(mctx, qemu.Query{Command: "query-status"})
			var st struct {
				Status  string `json:"status"`
				Running bool   `json:"running"`
			}
			if err == nil && json.Unmarshal(raw, &st) == nil && st.Status != "inmigrate" {
				// Anything but "still waiting for the stream" means the
				// stream completed: the guest is here, whatever its state.
				committed = true
				continue
			}
			if err := in.Stop(mctx); err != nil {
				errs = append(errs, fmt.Errorf("stop the destination QEMU of migration %q: %w", id, err))
			}
		}
	}
	if r, ok := in.(releaser); ok {
		for _, id := range ls.Reserved {
			if err := r.Release(asPeer(ctx, ls.Peer, id)); err != nil {
				errs = append(errs, fmt.Errorf("release migration %q: %w", id, err))
			}
		}
	}
	if committed {
		return errors.Join(append([]error{errCommitted}, errs...)...)
	}
	if dest != nil {
		for _, vm := range ls.VMs {
			errs = append(errs, dest.Abort(ctx, migrator.DestAbort{OldIP: vm.OldIP, NewIP: vm.NewIP}))
		}
		for _, img := range ls.Images {
			errs = append(errs, dest.Abort(ctx, migrator.DestAbort{Image: img}))
		}
		for _, t := range ls.Tunnels {
			errs = append(errs, dest.RetireTunnel(ctx, t))
		}
	}
	return errors.Join(errs...)
}

// releaser ends an incoming migration here and frees its ports
// (HostWork's incomings; the migration is ctx's).
type releaser interface {
	Release(ctx context.Context) error
}

// runLeases expires leases every TTL/4 until ctx ends.
func (a *PeerAPI) runLeases(ctx context.Context) {
	every := max(a.leases.ttl/4, 10*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.expireLeases(ctx)
	}
}

// expireLeases cleans up after the leases that expired, through what
// ServeDestination and ServeIncoming registered.
func (a *PeerAPI) expireLeases(ctx context.Context) map[string]error {
	a.mu.RLock()
	dest, in := a.dest, a.in
	a.mu.RUnlock()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return a.leases.expire(cctx, dest, in)
}

// Leases are the destination leases this host holds for its peers.
func (d *Daemon) Leases() []Lease { return d.peerAPI.leases.List() }
