// Package labrun runs vmhop migrations in the lab: it turns a lab, its guest
// and a migration spec into a migrator.Plan (hosts are the lab's
// namespaces), and measures what a client sees (Probe, Capture).
package labrun

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/ddns"
)

// Ports the destination listens on in an in-process lab migration
// (Plan: one at a time, no vmhopd). Through the daemons (Migrate), the
// destination's vmhopd takes them from MigrationPorts instead.
const (
	MigrationPort = 4444
	NBDPort       = 10809 // loopback; the relay listens on NBDPort+1
	ChunkedPort   = 10811
)

// Option changes how a lab migration is planned (Plan, Migrate).
type Option func(*options)

type options struct {
	continuity string
}

// Continuity sets both hosts' continuity mode (migrator.Host.Continuity):
// "ebpf" (the default) or "userspace" (proxy/wgpath: no BPF is loaded on
// either host).
func Continuity(mode string) Option { return func(o *options) { o.continuity = mode } }

// Plan builds the plan that moves vm from site A to site B of l under spec
// (limits, DNS, drain), changed by opts. The VM is adopted as it runs (its
// QEMU's command line, read through its QMP socket); the destination's
// tap is created (its image is created by the migration).
func Plan(ctx context.Context, l *lab.Lab, vm *lab.VM, spec *config.Migration, log *slog.Logger, opts ...Option) (*migrator.Plan, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	dm, err := l.MachineFor(lab.VMConfig{Name: vm.Name, Host: lab.SiteB, IP: vm.IP})
	if err != nil {
		return nil, err
	}
	dm.MemKiB = vm.Machine.MemKiB
	// Same definition as the source's: only paths and the host differ.
	// The destination image is created by the migration (Destination).
	dm.Append = vm.Machine.Append
	if err := l.AddTap(ctx, lab.SiteB, dm.Tap, false); err != nil {
		return nil, err
	}
	// The VM as it runs: its QEMU's own command line, host-specific parts
	// mapped to site B (as a spec's destination.disk and .tap would).
	adopted, err := qemu.Adopt(vm.Machine.QMPSocket, qemu.HostMap{
		Disks: map[string]string{vm.Machine.Disk: dm.Disk}, Taps: map[string]string{vm.Machine.Tap: dm.Tap},
		QMPSocket: dm.QMPSocket, PidFile: dm.PidFile, Console: dm.Console, Name: dm.Name,
	})
	if err != nil {
		return nil, err
	}
	if len(adopted.MACs) != 1 || len(adopted.Disks) != 1 {
		return nil, fmt.Errorf("lab vm %s: want one NIC and one disk, found MACs %v, disks %v", vm.Name, adopted.MACs, adopted.Disks)
	}
	key := make([]byte, 32)
	rand.Read(key)
	drv := qemu.New(qemu.Config{
		SourceQMP:  vm.Machine.QMPSocket,
		Dest:       dm,
		DestArgs:   adopted.Args,
		DestListen: netip.AddrPortFrom(lab.HostB, MigrationPort),
		Dial:       l.Dialer(lab.SiteA),
		Tuning:     daemon.SpecTuning(spec),
		Launcher:   l.Launcher(lab.SiteB),
		TLS:        &qemu.PSK{Username: "vmhop", Key: key, SourceDir: l.Path("tls-a"), DestDir: l.Path("tls-b")},
	})
	gwMAC, err := l.RouterMAC(lab.SiteA)
	if err != nil {
		return nil, err
	}
	vmMAC, err := parseMAC(adopted.MACs[0]) // the VM's, from its command line
	if err != nil {
		return nil, err
	}
	plan := daemon.SpecPlan(spec)
	p := &plan
	p.Label, p.VM, p.SourceQMP, p.Log = spec.Name, vm.Name, vm.Machine.QMPSocket, log
	p.Source = &migrator.Host{Name: "host A", Netns: l.NS(lab.SiteA), Address: lab.HostA, Uplink: lab.Uplink, PinDir: l.PinDir(lab.SiteA),
		Continuity: o.continuity}
	p.Dest = &migrator.Host{Name: "host B", Netns: l.NS(lab.SiteB), Address: lab.HostB, Uplink: lab.Uplink, PinDir: l.PinDir(lab.SiteB),
		Continuity: o.continuity}
	p.SourceWAN, p.DestWAN = lab.HostA, lab.HostB
	p.Driver, p.SourceDisk, p.DestDisk, p.DestTap = drv, adopted.Disks[0], dm.Disk, dm.Tap
	p.VMMAC, p.GatewayMAC = vmMAC, gwMAC
	// The health check goes where vmhopd on host A would send it from.
	p.Health.Dial = l.Dialer(lab.SiteA)
	// The destination serves NBD on its loopback; the relay carries it
	// over the WAN (see storage.Relay).
	p.Disk = &qemu.MirrorDisk{
		Driver:    drv,
		NBDListen: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), NBDPort),
		Relay: &storage.Relay{
			DialSource: l.Dialer(lab.SiteA), DialDest: l.Dialer(lab.SiteB),
			ListenDest: func(network, addr string) (net.Listener, error) { return netns.Listen(l.NS(lab.SiteB), network, addr) },
			DestWAN:    netip.AddrPortFrom(lab.HostB, NBDPort+1).String(),
			DestNBD:    netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), NBDPort).String(),
			SourceSock: l.Path("nbd-relay.sock"),
			Tuning:     daemon.SpecTuning(spec),
		},
		Log: log,
	}
	if spec.Storage.Mode == "chunked" {
		p.Disk = &storage.Chunked{Sync: &storage.ChunkedSync{
			Source:     storage.ChunkedSource{Path: vm.Machine.Disk, Chunk: int(spec.Storage.ChunkSize), Compress: true},
			Dest:       storage.ChunkedDest{Path: dm.Disk},
			DialSource: l.Dialer(lab.SiteA),
			ListenDest: func(network, addr string) (net.Listener, error) { return netns.Listen(l.NS(lab.SiteB), network, addr) },
			DestWAN:    netip.AddrPortFrom(lab.HostB, ChunkedPort).String(),
			Tuning:     daemon.SpecTuning(spec),
			FinalDelta: int64(spec.Storage.FinalDelta), MaxRounds: spec.Storage.MaxRounds,
			Log: log,
		}}
	}
	keyFile := spec.DNS.TSIGKeyFile
	if _, err := os.Stat(keyFile); err != nil {
		keyFile = l.KeyFile() // the lab's own key when the spec's is not on this machine
	}
	k, err := ddns.LoadKey(keyFile)
	if err != nil {
		return nil, err
	}
	// The migrator runs where vmhopd on host A would: DNS goes from there.
	p.DNS = &ddns.Client{Server: spec.DNS.Server, Key: k, Timeout: spec.DNS.Timeout, Dial: l.Dialer(lab.SiteA)}
	return p, nil
}

// Cleanup removes what a plan left on the hosts (datapaths and their pins;
// userspace continuity's tunnels, routes, rules, tables and VM entries).
func Cleanup(p *migrator.Plan) error {
	var errs []error
	for _, h := range []any{p.Source, p.Dest} {
		if h, ok := h.(*migrator.Host); ok {
			errs = append(errs, h.RemoveDatapath())
		}
	}
	return errors.Join(errs...)
}

// QEMU is the plan's QEMU driver (the lab's VMs are QEMU's).
func QEMU(p *migrator.Plan) *qemu.Driver {
	d, _ := p.Driver.(*qemu.Driver)
	return d
}

func parseMAC(s string) (net.HardwareAddr, error) {
	m, err := net.ParseMAC(s)
	if err != nil {
		return nil, fmt.Errorf("vm mac: %w", err)
	}
	return m, nil
}
