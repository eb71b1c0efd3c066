// Command datapath measures TCP throughput (iperf3) from the lab's client to
// a VM, side by side in one run: plain routing to the VM at site A; through
// the eBPF redirect (old address, tunnelled from host A to host B); to the
// new address (NAT on host B); and the same two through the userspace
// packet path (proxy/wgpath: WireGuard in this process, kernel routing,
// nftables NAT) that runs where eBPF cannot.
// The lab's links are plain veths here (no WAN emulator), so the numbers
// are the datapaths' own costs on this machine. Needs root and iperf3.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

func main() {
	lab.RunChild()
	out := flag.String("out", "", "also write the report here")
	secs := flag.Int("t", 8, "seconds per iperf3 run")
	flag.Parse()
	if err := run(*out, *secs); err != nil {
		fmt.Fprintln(os.Stderr, "datapath bench:", err)
		os.Exit(1)
	}
}

func iperf(ctx context.Context, l *lab.Lab, target string, secs int) (float64, error) {
	cmd := netns.Command(ctx, l.NS(lab.Client), "iperf3", "-c", target, "-t", fmt.Sprint(secs), "-J", "-O", "1")
	b, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("iperf3 -c %s: %w: %s", target, err, b)
	}
	var r struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return 0, err
	}
	return r.End.SumReceived.BitsPerSecond, nil
}

func run(out string, secs int) error {
	ctx := context.Background()
	l, err := lab.Up(ctx, lab.Config{Name: "benchdp", Links: map[string]lab.Profile{}})
	if err != nil {
		return err
	}
	defer l.Down()
	vm, err := l.StartNSVM(ctx)
	if err != nil {
		return err
	}
	srv := netns.Command(context.Background(), vm.NS, "iperf3", "-s")
	if err := srv.Start(); err != nil {
		return err
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	time.Sleep(500 * time.Millisecond)

	var rep strings.Builder
	fmt.Fprintf(&rep, "vmhop datapath throughput, %s; %d cores; iperf3 TCP, %d s per run, plain veth links\n",
		time.Now().UTC().Format(time.RFC3339), runtime.NumCPU(), secs)
	fmt.Fprintf(&rep, "tunnel: UDP with the migration's 64-bit token, checked on arrival (spoof check on)\n\n")
	res := map[string]float64{}
	measure := func(name, target string) error {
		bps, err := iperf(ctx, l, target, secs)
		if err != nil {
			return err
		}
		res[name] = bps
		fmt.Fprintf(&rep, "%-44s %7.2f Gbit/s\n", name, bps/1e9)
		return nil
	}
	if err := measure("plain routing (VM at site A)", lab.OldIP.String()); err != nil {
		return err
	}

	// Move the VM to site B and redirect.
	dpA, err := datapath.Load(datapath.Options{LocalIP: lab.HostA, PinDir: l.PinDir(lab.SiteA)})
	if err != nil {
		return err
	}
	defer netns.Do(l.NS(lab.SiteA), dpA.Remove)
	dpB, err := datapath.Load(datapath.Options{LocalIP: lab.HostB, PinDir: l.PinDir(lab.SiteB)})
	if err != nil {
		return err
	}
	defer netns.Do(l.NS(lab.SiteB), dpB.Remove)
	if err := netns.Do(l.NS(lab.SiteA), func() error { return dpA.Attach(datapath.Uplink, lab.Uplink) }); err != nil {
		return err
	}
	if err := netns.Do(l.NS(lab.SiteB), func() error { return dpB.Attach(datapath.Uplink, lab.Uplink) }); err != nil {
		return err
	}
	token, err := datapath.NewToken()
	if err != nil {
		return err
	}
	dpA.SetPeer(datapath.Tunnel{Peer: lab.HostB, Token: token}, true)
	dpB.SetPeer(datapath.Tunnel{Peer: lab.HostA, Token: token}, true)
	if err := l.UnplugNSVM(ctx, vm); err != nil {
		return err
	}
	tap, err := l.PlugNSVM(ctx, vm)
	if err != nil {
		return err
	}
	gw, _ := l.RouterMAC(lab.SiteA)
	if err := dpB.SetVM(datapath.VM{OldIP: lab.OldIP, NewIP: lab.NewIP, Gateway: lab.GatewayA, GatewayMAC: gw, MAC: vm.MAC, Tap: tap, Peer: lab.HostA, Token: token}); err != nil {
		return err
	}
	if err := netns.Do(l.NS(lab.SiteB), func() error { return dpB.Attach(datapath.VMTap, vm.Tap) }); err != nil {
		return err
	}
	if err := dpA.SetRedirect(lab.OldIP, datapath.Tunnel{Peer: lab.HostB, Token: token}, vm.MAC, true); err != nil {
		return err
	}
	netns.Run(ctx, l.NS(lab.WAN), "ip", "neigh", "flush", lab.OldIP.String())
	if err := measure("eBPF redirect (old address, A->B tunnel)", lab.OldIP.String()); err != nil {
		return err
	}
	if err := measure("new address (NAT at host B)", lab.NewIP.String()); err != nil {
		return err
	}

	// Userspace continuity: no BPF on either host; a WireGuard tunnel
	// between them, the VM entry on host B in routes and nftables.
	dpA.RemoveRedirect(lab.OldIP)
	dpB.RemoveVM(lab.OldIP, lab.NewIP)
	netns.Do(l.NS(lab.SiteA), dpA.Remove)
	netns.Do(l.NS(lab.SiteB), dpB.Remove)
	a := wgpath.New(wgpath.Options{Netns: l.NS(lab.SiteA), LocalIP: lab.HostA})
	b := wgpath.New(wgpath.Options{Netns: l.NS(lab.SiteB), LocalIP: lab.HostB})
	defer a.Close()
	defer b.Close()
	keyB, portB, err := b.OpenTunnel(token)
	if err != nil {
		return err
	}
	keyA, portA, err := a.OpenTunnel(token)
	if err != nil {
		return err
	}
	if err := a.SetPeer(token, wgpath.Peer{Key: keyB, Endpoint: netip.AddrPortFrom(lab.HostB, portB),
		Allowed: []netip.Prefix{netip.PrefixFrom(lab.OldIP, 32)}}); err != nil {
		return err
	}
	if err := b.SetPeer(token, wgpath.Peer{Key: keyA, Endpoint: netip.AddrPortFrom(lab.HostA, portA),
		Allowed: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}, Keepalive: 25 * time.Second}); err != nil {
		return err
	}
	if err := b.SetVM(wgpath.VM{OldIP: lab.OldIP, NewIP: lab.NewIP, GatewayMAC: gw, MAC: vm.MAC, Tap: vm.Tap, Token: token}); err != nil {
		return err
	}
	if err := a.SetRedirect(lab.OldIP, token, vm.MAC, true); err != nil {
		return err
	}
	netns.Run(ctx, l.NS(lab.WAN), "ip", "neigh", "flush", lab.OldIP.String())
	netns.Run(ctx, l.NS(lab.WAN), "ip", "neigh", "flush", lab.NewIP.String())
	if err := measure("userspace: WireGuard (old address, A->B)", lab.OldIP.String()); err != nil {
		return err
	}
	if err := measure("userspace: new address (nftables NAT at B)", lab.NewIP.String()); err != nil {
		return err
	}
	plain := res["plain routing (VM at site A)"]
	fmt.Fprintf(&rep, "\nredirect / plain: %.2f; NAT / plain: %.2f; userspace WireGuard / plain: %.2f; userspace NAT / plain: %.2f; eBPF redirect / userspace WireGuard: %.1f\n",
		res["eBPF redirect (old address, A->B tunnel)"]/plain, res["new address (NAT at host B)"]/plain,
		res["userspace: WireGuard (old address, A->B)"]/plain, res["userspace: new address (nftables NAT at B)"]/plain,
		res["eBPF redirect (old address, A->B tunnel)"]/res["userspace: WireGuard (old address, A->B)"])
	fmt.Print(rep.String())
	if out != "" {
		return os.WriteFile(out, []byte(rep.String()), 0o644)
	}
	return nil
}
