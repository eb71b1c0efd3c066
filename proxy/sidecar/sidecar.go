// Package sidecar picks a host's network-continuity mechanism: the eBPF
// datapath where it loads, else (or when asked) the userspace packet path
// (proxy/wgpath: a WireGuard tunnel per migration, kernel routes, proxy
// ARP and nftables NAT), and says which, clearly, in the log. Both carry
// a moved VM's open connections; the TCP proxy that once was the fallback
// (it reset them) is gone.
package sidecar

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

// Mode is the mechanism in use; its value is migrator.Host's Continuity.
type Mode string

const (
	EBPF      Mode = "ebpf"
	Userspace Mode = "userspace"
)

// Sidecar is a host's continuity mechanism.
type Sidecar struct {
	Mode Mode
	// DP is the datapath in EBPF mode (nil in Userspace mode, where each
	// migration makes its own tunnel and entries through proxy/wgpath:
	// migrator.Host with Continuity "userspace").
	DP *datapath.Datapath
}

// Load is datapath.Load and Check is wgpath.Check; tests replace them.
var (
	Load  = datapath.Load
	Check = wgpath.Check
)

// Start chooses by want ("auto", "ebpf", "userspace") and, with eBPF,
// attaches the uplink program to uplink. The userspace path is checked
// before it is chosen (a TUN device can be made, nftables answers): a
// host that can run neither mechanism fails to start, naming both
// reasons.
func Start(want string, opts datapath.Options, uplink string, log *slog.Logger) (*Sidecar, error) {
	if want == "userspace" {
		if err := Check(""); err != nil {
			return nil, fmt.Errorf("network continuity (userspace): %w", err)
		}
		log.Info("network continuity: userspace packet path (configured): WireGuard tunnel per migration, kernel routing and nftables NAT; open connections survive a move")
		return &Sidecar{Mode: Userspace}, nil
	}
	dp, err := Load(opts)
	if err == nil {
		if err = dp.Attach(datapath.Uplink, uplink); err != nil {
			dp.Close()
		}
	}
	switch {
	case err == nil:
		log.Info("network continuity: eBPF datapath", "uplink", uplink, "pins", opts.PinDir)
		return &Sidecar{Mode: EBPF, DP: dp}, nil
	case want == "auto" && errors.Is(err, datapath.ErrUnsupported):
		if uerr := Check(""); uerr != nil {
			return nil, fmt.Errorf("network continuity (auto): eBPF: %w; userspace: %w", err, uerr)
		}
		log.Warn("network continuity: eBPF unavailable, using the userspace packet path (WireGuard tunnel, kernel routing and nftables NAT): open connections survive a move, at a lower packet rate than eBPF",
			"reason", err)
		return &Sidecar{Mode: Userspace}, nil
	default:
		return nil, fmt.Errorf("network continuity (%s): %w", want, err)
	}
}

// Close releases the process's handles; pinned eBPF state keeps forwarding.
func (s *Sidecar) Close() error {
	if s.DP != nil {
		return s.DP.Close()
	}
	return nil
}
