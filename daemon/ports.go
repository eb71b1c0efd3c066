package daemon

import (
	"context"
	"net"
	"regexp"
	"slices"
	"strconv"
	"sync"

	"github.com/vmhop/vmhop/internal/config"
)

// MigrationPorts are the ports one incoming migration holds on its
// destination host, taken from vmhopd.migration_ports when the source
// reserves the migration (peer method incoming.reserve) and handed back
// in its reply; freed when the migration ends (incoming.release, the
// source's lease expiring, or a restart of the destination's vmhopd,
// which holds them in memory only).
type MigrationPorts struct {
	Memory  uint16 `json:"memory"`  // the memory stream (QEMU -incoming), on the WAN address
	NBD     uint16 `json:"nbd"`     // the destination QEMU's NBD server, on the loopback
	Relay   uint16 `json:"relay"`   // the disk relay's destination end, on the WAN address
	Chunked uint16 `json:"chunked"` // the chunked engine's destination end, on the WAN address
}

func (p MigrationPorts) list() []uint16 { return []uint16{p.Memory, p.NBD, p.Relay, p.Chunked} }

// portPool hands out vmhopd.migration_ports, config.PortsPerMigration
// at a time, each port to one migration (by its key, peer/id). A port
// something else on the host listens on is skipped (free says so).
type portPool struct {
	rng  config.PortRange
	free func(port uint16) bool // nil: bindable on every address (tcpFree)

	mu   sync.Mutex
	held map[uint16]string // port -> migration key
}

// tcpFree says whether a TCP listener on every address can take port,
// that is no socket on this host (this network namespace) holds it.
func tcpFree(port uint16) bool {
	ln, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(int(port))))
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// reserve takes the ports of migration key: the ones it holds already,
// else the lowest free ones of the range. The range exhausted is
// CodeUnavailable, naming the key and what holds the ports.
func (p *portPool) reserve(key string) (MigrationPorts, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held == nil {
		p.held = map[uint16]string{}
	}
	var got []uint16
	for port, k := range p.held {
		if k == key {
			got = append(got, port)
		}
	}
	if len(got) == config.PortsPerMigration {
		slices.Sort(got)
		return MigrationPorts{got[0], got[1], got[2], got[3]}, nil
	}
	free := p.free
	if free == nil {
		free = tcpFree
	}
	got = got[:0]
	busy := 0
	for port := int(p.rng.Min); port <= int(p.rng.Max) && p.rng.Len() > 0 && len(got) < config.PortsPerMigration; port++ {
		if _, ok := p.held[uint16(port)]; ok {
			continue
		}
		if !free(uint16(port)) {
			busy++
			continue
		}
		got = append(got, uint16(port))
	}
	if len(got) < config.PortsPerMigration {
		others := map[string]bool{}
		for _, k := range p.held {
			others[k] = true
		}
		return MigrationPorts{}, Errorf(CodeUnavailable,
			"vmhopd.migration_ports %s has no %d free ports for this incoming migration: %d held by %d incoming migrations, %d taken by other programs on this host; wait for one to end or widen the range",
			p.rng, config.PortsPerMigration, len(p.held), len(others), busy)
	}
	for _, port := range got {
		p.held[port] = key
	}
	return MigrationPorts{got[0], got[1], got[2], got[3]}, nil
}

// release frees the ports of migration key and says how many it held.
func (p *portPool) release(key string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for port, k := range p.held {
		if k == key {
			delete(p.held, port)
			n++
		}
	}
	return n
}

// inUse is how many ports of the range migrations hold.
func (p *portPool) inUse() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.held)
}

// migrationHeader carries the migration a peer call belongs to (the
// source's job ID), so that a destination keeps each incoming
// migration's QEMU, ports, taps, secrets and record apart. Calls without
// it belong to the peer's unnamed migration ("").
const migrationHeader = "Vmhop-Migration"

// migrationIDRE is a migration ID as it may cross: a job ID.
var migrationIDRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{0,128}$`)

type migrationKey struct{}

// withMigration is ctx for calls of migration id (the peer API's
// handlers find it with migrationID).
func withMigration(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, migrationKey{}, id)
}

// migrationID is the migration a peer call belongs to ("": none named).
func migrationID(ctx context.Context) string {
	s, _ := ctx.Value(migrationKey{}).(string)
	return s
}

// incomingKey names an incoming migration on this host: the calling
// peer and its migration ID ("site-a.vmhop/3f2c...").
func incomingKey(ctx context.Context) string { return peerName(ctx) + "/" + migrationID(ctx) }

// asPeer is ctx as if peer had called for its migration id (what a
// lease's expiry acts in).
func asPeer(ctx context.Context, peer, id string) context.Context {
	return withMigration(context.WithValue(ctx, peerKey{}, peer), id)
}

// ForMigration is c for the calls of migration id: each carries it
// (header Vmhop-Migration), so the peer keeps this migration's state
// apart from any other it serves at the same time.
func (c *PeerClient) ForMigration(id string) *PeerClient {
	cc := *c
	cc.migration = id
	return &cc
}

// errPortNotReserved is a disk or stream listener asked on a port the
// migration does not hold.
func errPortNotReserved(what string, port uint16, p MigrationPorts, ok bool) error {
	if !ok {
		return Errorf(CodeFailedPrecondition, "%s on port %d: this migration reserved no ports here (peer method incoming.reserve first)", what, port)
	}
	return Errorf(CodePermissionDenied, "%s on port %d: not one of this migration's ports %v", what, port, p.list())
}
