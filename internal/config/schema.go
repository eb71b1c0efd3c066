// Package config reads and validates vmhop's two YAML files: the host daemon's
// (top-level key "vmhopd") and a migration spec (top-level key "migration").
// It is the only package that knows about viper; everything else takes the
// typed structs below.
package config

import (
	"net/netip"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

// Daemon configures vmhopd on one host. See configs/vmhopd.yaml.
type Daemon struct {
	// Name is this host's name: a DNS name (SAN) in its certificate
	// (tls.cert), the name other hosts list it by in their peers.
	Name string `key:"name"`
	// Listen is the host:port of the peer API (mutual TLS) other hosts' vmhopd dial.
	Listen string `key:"listen"`
	// Socket is the unix socket of the local API the vmhop CLI talks to
	// (mode 0660, group vmhop when that group exists).
	Socket string `key:"socket"`
	// Peers are the other hosts' daemons this one accepts and calls; no
	// other certificate gets in, even one signed by tls.ca.
	Peers []Peer `key:"peers"`
	// StateDir holds migration state and manifests that survive a restart.
	StateDir string `key:"state_dir"`
	// Uplink is the interface facing the WAN; the redirect datapath attaches here.
	Uplink string `key:"uplink"`
	// Address is this host's WAN address: the tunnel endpoint peers send to.
	Address netip.Addr `key:"address"`
	// Datapath selects the network-continuity mechanism: "auto" (eBPF, else the
	// userspace packet path: WireGuard tunnel, kernel routing, nftables NAT),
	// "ebpf", or "userspace". Both hosts of a migration must use the same.
	Datapath string `key:"datapath"`
	// BPFFS is where maps and links are pinned so forwarding outlives a restart.
	BPFFS string `key:"bpffs"`
	// TLS secures the peer API and the streams between hosts.
	TLS TLS `key:"tls"`
	// LogLevel is one of debug, info, warn, error. SIGHUP applies a new one.
	LogLevel string `key:"log_level"`
	// LogFormat is "text" (logfmt-like key=value lines) or "json" (one
	// JSON object a line: slog's JSONHandler), both on stderr.
	LogFormat string `key:"log_format"`
	// MetricsListen is the host:port of the Prometheus /metrics endpoint
	// (plain HTTP: bind it to a management address); "" serves none.
	MetricsListen string `key:"metrics_listen"`
	// MigrationPorts is the range the ports of incoming migrations are
	// taken from, PortsPerMigration for each (its memory stream, its
	// destination QEMU's NBD server on the loopback, its disk relay, its
	// chunked engine), handed to the source over the peer API; freed when
	// the migration ends. As libvirt's migration_port_min/max.
	MigrationPorts PortRange `key:"migration_ports"`
}

// Peer is another host's vmhopd.
type Peer struct {
	// Name is a DNS name (SAN) in the peer's certificate: its identity.
	Name string `key:"name"`
	// Address is the host:port of its peer API (its listen key).
	Address string `key:"address"`
}

// TLS names PEM files for mutual TLS between vmhop daemons.
type TLS struct {
	Cert string `key:"cert"` // this host's certificate
	Key  string `key:"key"`  // its private key
	CA   string `key:"ca"`   // CA that signs every peer's certificate
}

// Migration describes one move of one VM. See configs/migration.yaml.
type Migration struct {
	// Name labels the migration in logs, state files and reports.
	Name        string      `key:"name"`
	VM          VM          `key:"vm"`
	Source      Source      `key:"source"`
	Destination Destination `key:"destination"`
	Network     Network     `key:"network"`
	DNS         DNS         `key:"dns"`
	Limits      Limits      `key:"limits"`
	Storage     Storage     `key:"storage"`
	Health      Health      `key:"health_check"`
}

// Health is how vmhop decides, after the destination resumes, that the VM
// serves there. Until a check passes the source VM is kept, paused; a VM
// that does not pass by Deadline fails the migration ("moved, but the VM
// does not answer at the destination"). Checks go from the source host to
// network.new_ip, the path new clients take. With neither check set, none
// runs (the report says so).
type Health struct {
	// TCPPort: a TCP connection to new_ip on this port must be accepted (0: no TCP check).
	TCPPort uint16 `key:"tcp_port"`
	// HTTPPath: a GET of http://new_ip:HTTPPort/HTTPPath must answer 2xx or 3xx ("": no HTTP check).
	HTTPPath string `key:"http_path"`
	// HTTPPort is the HTTP check's port.
	HTTPPort uint16 `key:"http_port"`
	// Deadline is how long after resume the VM has to pass every check.
	Deadline time.Duration `key:"deadline"`
}

// VM identifies the guest on the source host.
type VM struct {
	// Hypervisor is "qemu" or "virtualbox".
	Hypervisor string `key:"hypervisor"`
	// Name is the VM's name (VirtualBox) or label (QEMU).
	Name string `key:"name"`
	// QMPSocket is the source QEMU's QMP unix socket (qemu only).
	QMPSocket string `key:"qmp_socket"`
	// Disk is the path of the VM's disk image on the source host.
	Disk string `key:"disk"`
}

// Source is the host the VM runs on: the host whose vmhopd is given the
// spec, which checks that it is this host.
type Source struct {
	// Daemon is the host:port of vmhopd on that host (its listen key).
	Daemon string `key:"daemon"`
	// Address is the host's WAN address (tunnel endpoint, migration stream):
	// that vmhopd's own address key.
	Address netip.Addr `key:"address"`
}

// Destination is the host the VM moves to, with what is host-specific
// there: the source's QEMU command line is replayed on it with these
// paths and devices in place of the source's.
type Destination struct {
	// Daemon is the host:port of vmhopd on that host: one of the source
	// vmhopd's peers (its address key).
	Daemon string `key:"daemon"`
	// Address is the host's WAN address (tunnel endpoint, migration stream).
	Address netip.Addr `key:"address"`
	// Disk is where the VM's disk is written on that host (created there;
	// an existing file is refused, never truncated).
	Disk string `key:"disk"`
	// Tap is the VM's tap device on that host (qemu): vmhopd there creates
	// it, up, and the destination QEMU uses it in place of the source's.
	Tap string `key:"tap"`
	// Bridge, if set, is the bridge on that host the tap joins; "" leaves
	// the tap alone (the datapath delivers the VM's traffic).
	Bridge string `key:"bridge"`
	// QMPSocket is the destination QEMU's QMP socket (qemu); "" means the
	// same path as vm.qmp_socket. Its pid file and console log, if the
	// source QEMU has them, go beside it (NAME.pid, NAME.console).
	QMPSocket string `key:"qmp_socket"`
}

// Network is the VM's address change.
type Network struct {
	// OldIP is the VM's address at the source site; the guest keeps it.
	OldIP netip.Addr `key:"old_ip"`
	// NewIP is the address the VM is reached at from the destination site on.
	NewIP netip.Addr `key:"new_ip"`
	// Gateway is the guest's default gateway at the source site; the destination
	// host answers for it on the VM's tap so the guest needs no change.
	Gateway netip.Addr `key:"gateway"`
	// OldIP6, NewIP6 and Gateway6 are a dual-stack VM's IPv6 side, set all
	// three or none: its IPv6 address at the source site (kept by the
	// guest), the one it is reached at from the destination site on, and
	// its IPv6 default gateway there (link-local allowed: host B answers
	// neighbour solicitations for it on the tap). OldIP, NewIP and Gateway
	// are then the IPv4 side; the DNS flip replaces A and AAAA together.
	OldIP6   netip.Addr `key:"old_ip6"`
	NewIP6   netip.Addr `key:"new_ip6"`
	Gateway6 netip.Addr `key:"gateway6"`
	// DrainTimeout bounds how long the redirect stays after the switch while old
	// flows are still active.
	DrainTimeout time.Duration `key:"drain_timeout"`
	// DrainIdle removes the redirect early once no redirected packet has been seen for this long.
	DrainIdle time.Duration `key:"drain_idle"`
	// Redirect (default true) sends the packets that reach the source for
	// old_ip to the VM at the destination from the switch on (eBPF or the
	// userspace fallback, per vmhopd.datapath). false: DNS flip only;
	// connections open at the move are lost (for services whose clients
	// reconnect by name, and to measure what the redirect is worth).
	Redirect bool `key:"redirect"`
}

// OldAddrs is the VM's addresses at the source site: old_ip, and old_ip6
// when set (the name's A and AAAA records before the flip).
func (n Network) OldAddrs() []netip.Addr { return addrs(n.OldIP, n.OldIP6) }

// NewAddrs is the VM's addresses at the destination site: new_ip, and
// new_ip6 when set (the name's records after the flip).
func (n Network) NewAddrs() []netip.Addr { return addrs(n.NewIP, n.NewIP6) }

func addrs(as ...netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range as {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// DNS is the Dynamic DNS record to flip.
type DNS struct {
	// Server is the primary that accepts RFC 2136 updates, as host:port.
	Server string `key:"server"`
	// Zone is the zone apex, e.g. "example.".
	Zone string `key:"zone"`
	// Name is the record to flip, e.g. "svc.example.".
	Name string `key:"name"`
	// TTL is the low TTL set by prepare and used for the new record, in seconds.
	TTL uint32 `key:"ttl" unit:"seconds"`
	// TSIGKeyFile is a BIND-format key file ("key "name" { algorithm ...; secret ...; };").
	TSIGKeyFile string `key:"tsig_key_file"`
	// Timeout bounds each DNS exchange.
	Timeout time.Duration `key:"timeout"`
}

// Limits bound the runtime-state migration.
type Limits struct {
	// Bandwidth caps the migration streams (RAM and disk share it).
	Bandwidth units.Bitrate `key:"bandwidth"`
	// Downtime is the pause the hypervisor aims for at switchover.
	Downtime time.Duration `key:"downtime"`
	// Deadline aborts the migration if it has not completed by then.
	Deadline time.Duration `key:"deadline"`
	// MaxIterations aborts (or escalates) when pre-copy has not converged after this many passes.
	MaxIterations int `key:"max_iterations" unit:"passes"`
	// AutoConverge lets the hypervisor throttle the guest's CPU when it dirties memory too fast.
	AutoConverge bool `key:"auto_converge"`
	// Pacing is how the kernel paces the migration's WAN sockets (the
	// disk stream: storage.qemu's relay or the chunked engine; the memory
	// stream: QEMU's, dialled by vmhopd and handed to QEMU, when pacing is
	// not "off" or congestion is set; SO_MAX_PACING_RATE, TCP's internal
	// pacing, no fq needed): "off" (the budget's token bucket and QEMU's
	// max-bandwidth alone: each window leaves at line rate, a burst that
	// fills the uplink's queue in front of the VM's own packets), "budget"
	// (evenly at the budget), or "yield" (at the budget while the path's
	// queue stays under 10 ms, lower while it grows: a delay-based
	// scavenger).
	Pacing string `key:"pacing"`
	// Congestion is the TCP congestion control of the same sockets
	// ("bbr", "cubic", "reno", ... as the source host's kernel offers
	// them: /proc/sys/net/ipv4/tcp_available_congestion_control); ""
	// (default) keeps the host's default.
	Congestion string `key:"congestion"`
}

// Storage controls the staged disk copy.
type Storage struct {
	// Mode is "qemu" (QEMU dirty bitmaps to an NBD export) or "chunked"
	// (hash-compared chunks, for images without hypervisor dirty tracking).
	Mode string `key:"mode"`
	// ChunkSize is the unit the chunked engine hashes and sends.
	ChunkSize units.ByteSize `key:"chunk_size"`
	// FinalDelta: once a delta round is at most this big, the rest is sent inside the pause.
	FinalDelta units.ByteSize `key:"final_delta"`
	// MaxRounds bounds the delta rounds before the pause.
	MaxRounds int `key:"max_rounds" unit:"rounds"`
}

// DefaultDaemon returns a Daemon with every optional field set.
func DefaultDaemon() Daemon {
	return Daemon{
		Listen:    "0.0.0.0:7710",
		Socket:    "/run/vmhop/vmhopd.sock",
		StateDir:  "/var/lib/vmhop",
		Datapath:  "auto",
		BPFFS:     "/sys/fs/bpf/vmhop",
		LogLevel:  "info",
		LogFormat: "text",
		// libvirt's default range: 16 migrations at once.
		MigrationPorts: PortRange{Min: 49152, Max: 49215},
	}
}

// DefaultMigration returns a Migration with every optional field set.
func DefaultMigration() Migration {
	return Migration{
		VM:      VM{Hypervisor: "qemu"},
		Network: Network{DrainTimeout: 10 * time.Minute, DrainIdle: 30 * time.Second, Redirect: true},
		DNS:     DNS{TTL: 5, Timeout: 5 * time.Second},
		Limits: Limits{
			Bandwidth:     100 * units.Mbit,
			Downtime:      300 * time.Millisecond,
			Deadline:      30 * time.Minute,
			MaxIterations: 30,
			AutoConverge:  true,
			Pacing:        "yield",
		},
		Storage: Storage{Mode: "qemu", ChunkSize: units.MiB, FinalDelta: 16 * units.MiB, MaxRounds: 10},
		Health:  Health{HTTPPort: 80, Deadline: 30 * time.Second},
	}
}
