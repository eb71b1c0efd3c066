package migrator

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/proxy/datapath"
)

// Host is one end of a migration as the migrator drives it: its network
// continuity datapath, run in its network namespace. On a real deployment
// that is vmhopd's own namespace on each host (the daemon's peer API that
// carries these calls between hosts is still to come); in the lab, each
// host is a namespace on this machine.
type Host struct {
	Name    string
	Netns   string     // network namespace; "" is this process's
	Address netip.Addr // WAN address: tunnel endpoint, migration streams
	Uplink  string     // WAN-facing interface the datapath attaches to
	PinDir  string     // bpffs directory for the datapath's pins
	dp      *datapath.Datapath
}

func (h *Host) do(fn func() error) error {
	if h.Netns == "" {
		return fn()
	}
	return netns.Do(h.Netns, fn)
}

// Datapath loads and attaches the host's datapath once.
func (h *Host) Datapath() (*datapath.Datapath, error) {
	if h.dp != nil {
		return h.dp, nil
	}
	dp, err := datapath.Load(datapath.Options{LocalIP: h.Address, PinDir: h.PinDir})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	if err := h.do(func() error { return dp.Attach(datapath.Uplink, h.Uplink) }); err != nil {
		dp.Close()
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	h.dp = dp
	return dp, nil
}

// AttachVM attaches the VM-side program to the VM's tap on this host.
func (h *Host) AttachVM(tap string) (int, error) {
	var idx int
	err := h.do(func() error {
		ifi, err := net.InterfaceByName(tap)
		if err != nil {
			return err
		}
		idx = ifi.Index
		return h.dp.Attach(datapath.VMTap, tap)
	})
	return idx, err
}

// RemoveDatapath detaches and unpins everything this host's datapath holds.
func (h *Host) RemoveDatapath() error {
	if h.dp == nil {
		return nil
	}
	err := h.do(h.dp.Remove)
	h.dp = nil
	return err
}
