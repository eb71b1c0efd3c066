package sidecar

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

func TestChoice(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	opts := datapath.Options{LocalIP: netip.MustParseAddr("10.1.0.2")}
	defer func() { Load, Check = datapath.Load, wgpath.Check }()
	Check = func(string) error { return nil }
	Load = func(datapath.Options) (*datapath.Datapath, error) {
		return nil, fmt.Errorf("%w: operation not permitted", datapath.ErrUnsupported)
	}

	s, err := Start("auto", opts, "eth0", log)
	if err != nil || s.Mode != Userspace {
		t.Fatalf("auto without BPF: %+v, %v", s, err)
	}
	if !strings.Contains(logs.String(), "eBPF unavailable, using the userspace packet path") {
		t.Errorf("fallback not logged: %s", logs.String())
	}
	if _, err := Start("ebpf", opts, "eth0", log); err == nil || !strings.Contains(err.Error(), "network continuity (ebpf)") {
		t.Errorf("ebpf forced without BPF: %v", err)
	}
	if s, err := Start("userspace", opts, "eth0", log); err != nil || s.Mode != Userspace {
		t.Errorf("userspace: %+v, %v", s, err)
	}

	// Neither mechanism: the host does not start, and says why for both.
	Check = func(string) error { return errors.New("open /dev/net/tun: no such file") }
	if _, err := Start("auto", opts, "eth0", log); err == nil || !strings.Contains(err.Error(), "operation not permitted") ||
		!strings.Contains(err.Error(), "/dev/net/tun") {
		t.Errorf("auto with neither: %v", err)
	}
	if _, err := Start("userspace", opts, "eth0", log); err == nil || !strings.Contains(err.Error(), "network continuity (userspace)") {
		t.Errorf("userspace without TUN: %v", err)
	}
}
