// Package sidecar picks and runs a host's network-continuity mechanism:
// the eBPF datapath where it loads, else (or when asked) the userspace
// proxy, and says which, clearly, in the log.
package sidecar

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/vmhop/vmhop/proxy/datapath"
)

// Mode is the mechanism in use.
type Mode string

const (
	EBPF      Mode = "ebpf"
	Userspace Mode = "userspace"
)

// Sidecar is a host's continuity mechanism.
type Sidecar struct {
	Mode Mode
	// DP is the datapath in EBPF mode (nil in Userspace mode, where the
	// migrator starts a userspace.Proxy per migration on the old host).
	DP *datapath.Datapath
}

// Load is datapath.Load; tests replace it.
var Load = datapath.Load

// Start chooses by want ("auto", "ebpf", "userspace") and, with eBPF,
// attaches the uplink program to uplink.
func Start(want string, opts datapath.Options, uplink string, log *slog.Logger) (*Sidecar, error) {
	if want == "userspace" {
		log.Warn("network continuity: userspace proxy (configured): open TCP connections do not survive a move")
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
		log.Warn("network continuity: eBPF unavailable, using the userspace proxy: new connections to a moved VM's old address are proxied, open TCP connections do not survive a move",
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
