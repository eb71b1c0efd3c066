package config

import (
	"fmt"
	"strconv"
	"strings"
)

// PortRange is an inclusive range of TCP ports, written "MIN-MAX"
// ("49152-49215"), as libvirt's qemu.conf bounds its migration ports
// (migration_port_min, migration_port_max).
type PortRange struct {
	Min, Max uint16
}

// PortsPerMigration is how many ports of vmhopd.migration_ports one
// incoming migration holds: the memory stream, the destination QEMU's
// NBD server (on the loopback), the disk relay and the chunked engine.
const PortsPerMigration = 4

// String is the range as it is written.
func (r PortRange) String() string { return fmt.Sprintf("%d-%d", r.Min, r.Max) }

// Len is how many ports the range holds (0 for an unset range).
func (r PortRange) Len() int {
	if r.Min == 0 || r.Max < r.Min {
		return 0
	}
	return int(r.Max) - int(r.Min) + 1
}

// Contains says whether port is in the range.
func (r PortRange) Contains(port uint16) bool { return r.Len() > 0 && port >= r.Min && port <= r.Max }

// MarshalText implements encoding.TextMarshaler.
func (r PortRange) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler: "MIN-MAX", both
// from 1024 to 65535 (vmhopd does not take privileged ports), MIN <= MAX,
// room for at least one migration (PortsPerMigration ports).
func (r *PortRange) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	lo, hi, ok := strings.Cut(s, "-")
	if !ok {
		return fmt.Errorf("%q is not a port range MIN-MAX (e.g. \"49152-49215\")", s)
	}
	min, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	max, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	switch {
	case err1 != nil || err2 != nil:
		return fmt.Errorf("%q is not a port range MIN-MAX of ports from 1024 to 65535", s)
	case min < 1024:
		return fmt.Errorf("%q: %d is a privileged port (want 1024 to 65535)", s, min)
	case min > max:
		return fmt.Errorf("%q: MIN %d is above MAX %d", s, min, max)
	case max-min+1 < PortsPerMigration:
		return fmt.Errorf("%q holds %d ports: one incoming migration takes %d", s, max-min+1, PortsPerMigration)
	}
	r.Min, r.Max = uint16(min), uint16(max)
	return nil
}
