package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"

	"github.com/vmhop/vmhop/bpf"
)

// Entries are the migration entries a pinned datapath holds, read from its
// pins without loading the programs (a test or an operator looking at a
// host whose vmhopd is down). IPv4 only: the IPv6 maps follow their IPv4
// entries.
type Entries struct {
	// Redirects: old address -> whether the redirect is on (off: installed
	// for a migration, not yet switched).
	Redirects map[netip.Addr]bool
	// VMs are the old addresses of the VMs this host delivers to; NAT the
	// new addresses it translates for them.
	VMs []netip.Addr
	NAT []netip.Addr
	// Peers are the tunnel peers accepted, once per token.
	Peers []netip.Addr
}

// Empty says whether nothing of any migration is in the maps.
func (e Entries) Empty() bool {
	return len(e.Redirects) == 0 && len(e.VMs) == 0 && len(e.NAT) == 0 && len(e.Peers) == 0
}

// ReadPinned reads the entries of the datapath pinned in pinDir. A pin
// directory that does not exist holds nothing (zero Entries, no error).
func ReadPinned(pinDir string) (Entries, error) {
	var e Entries
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return e, nil
	}
	open := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("datapath: pinned map %s: %w", name, err)
		}
		return m, nil
	}
	addr := func(a uint32) netip.Addr {
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], a)
		return netip.AddrFrom4(b)
	}
	var errs []error
	if m, err := open("redirects"); err != nil {
		errs = append(errs, err)
	} else {
		e.Redirects = map[netip.Addr]bool{}
		var k uint32
		var v bpf.DatapathRedirect
		it := m.Iterate()
		for it.Next(&k, &v) {
			e.Redirects[addr(k)] = v.Mode != 0
		}
		errs = append(errs, it.Err())
		m.Close()
	}
	for _, mm := range []struct {
		name string
		out  *[]netip.Addr
	}{{"vms", &e.VMs}, {"nat", &e.NAT}} {
		m, err := open(mm.name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var k uint32
		it := m.Iterate()
		var v []byte
		for it.Next(&k, &v) {
			*mm.out = append(*mm.out, addr(k))
		}
		errs = append(errs, it.Err())
		m.Close()
	}
	if m, err := open("peers"); err != nil {
		errs = append(errs, err)
	} else {
		var k bpf.DatapathPeerKey
		var v uint32
		it := m.Iterate()
		for it.Next(&k, &v) {
			if k.Token != 0 {
				e.Peers = append(e.Peers, addr(k.Addr))
			}
		}
		errs = append(errs, it.Err())
		m.Close()
	}
	if len(e.Redirects) == 0 {
		e.Redirects = nil
	}
	return e, errors.Join(errs...)
}
