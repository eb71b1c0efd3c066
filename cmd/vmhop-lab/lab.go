package main

import (
	"errors"
	"fmt"
	"io"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/internal/units"
)

func newLabCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "lab",
		Short: "Build and drive the two-site WAN lab (network namespaces, BIND9, QEMU guests)",
	}
	var name string
	c.PersistentFlags().StringVar(&name, "name", "lab", "lab name (1-8 lowercase letters or digits); namespaces are vh-NAME-HOST")

	var siteDelay, clientDelay time.Duration
	var siteRate string
	var loss float64
	var noDaemons bool
	up := &cobra.Command{
		Use:   "up",
		Short: "Build the lab (replacing any earlier lab of that name) and print how to use it",
		RunE: func(cmd *cobra.Command, args []string) error {
			rate, err := units.ParseBitrate(siteRate)
			if err != nil {
				return fmt.Errorf("--site-rate: %w", err)
			}
			if loss < 0 || loss >= 1 {
				return fmt.Errorf("--loss: %v is not in [0,1)", loss)
			}
			site := lab.Profile{Delay: siteDelay, Rate: rate, Loss: loss}
			ctx, stop := cli.SignalContext()
			defer stop()
			l, err := lab.Up(ctx, lab.Config{Name: name, Links: map[string]lab.Profile{
				lab.SiteA: site, lab.SiteB: site, lab.Client: {Delay: clientDelay, Loss: loss},
			}})
			if err != nil {
				return err
			}
			if !noDaemons {
				if err := labrun.StartDaemons(ctx, l); err != nil {
					return errors.Join(fmt.Errorf("lab %s: vmhopd: %w", name, err), l.Down())
				}
			}
			printLab(cmd.OutOrStdout(), l)
			return nil
		},
	}
	d := lab.DefaultLinks()
	up.Flags().BoolVar(&noDaemons, "no-daemons", false, "do not start a vmhopd at each site (vmhop-lab migrate starts them when it needs them)")
	up.Flags().DurationVar(&siteDelay, "site-delay", d[lab.SiteA].Delay, "one-way delay of each site's WAN link (site to site: twice this)")
	up.Flags().StringVar(&siteRate, "site-rate", d[lab.SiteA].Rate.String(), "rate of each site's WAN link")
	up.Flags().DurationVar(&clientDelay, "client-delay", d[lab.Client].Delay, "one-way delay of the client's WAN link")
	up.Flags().Float64Var(&loss, "loss", 0, "random frame loss on every emulated link, 0 to <1")

	down := &cobra.Command{
		Use:   "down",
		Short: "Remove the lab: its processes, namespaces and files",
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := lab.Down(name, ""); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "lab %s removed\n", name)
			return nil
		},
	}
	status := &cobra.Command{
		Use:   "status",
		Short: "Show labs, their namespaces, processes and VMs",
		RunE: func(cmd *cobra.Command, args []string) error {
			names, err := lab.List()
			if err != nil {
				return err
			}
			if len(names) == 0 {
				fmt.Fprintln(cmd.OutOrStdout(), "no labs")
			}
			for _, n := range names {
				l, err := lab.Open(n)
				if err != nil {
					fmt.Fprintf(cmd.OutOrStdout(), "%s: %v\n", n, err)
					continue
				}
				printLab(cmd.OutOrStdout(), l)
			}
			return nil
		},
	}

	var vmName string
	var mem int
	var exactRAM bool
	var disk string
	vmStart := &cobra.Command{
		Use:   "start",
		Short: "Boot the lab guest under QEMU at site A and wait until it answers the client",
		RunE: func(cmd *cobra.Command, args []string) error {
			size, err := units.ParseByteSize(disk)
			if err != nil {
				return fmt.Errorf("--disk-size: %w", err)
			}
			l, err := lab.Open(name)
			if err != nil {
				return err
			}
			ctx, stop := cli.SignalContext()
			defer stop()
			start := time.Now()
			vm, err := l.StartVM(ctx, lab.VMConfig{Name: vmName, MemMiB: mem, DiskSize: size, ExactRAM: exactRAM})
			if err != nil {
				return err
			}
			if err := l.WaitGuest(ctx, vm.IP, 90*time.Second); err != nil {
				return fmt.Errorf("vm %s started but does not answer: %w (console: %s)", vmName, err, vm.Machine.Console)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "vm %s answers at %s after %s\n  QMP:     %s\n  disk:    %s\n  console: %s\n  try:     ip netns exec %s wget -qO- http://%s/\n",
				vmName, vm.IP, time.Since(start).Round(time.Millisecond), vm.Machine.QMPSocket, vm.Machine.Disk,
				vm.Machine.Console, l.NS(lab.Client), vm.IP)
			return nil
		},
	}
	vmStart.Flags().StringVar(&vmName, "vm", "vm", "VM name")
	vmStart.Flags().IntVar(&mem, "mem", 128, "guest RAM in MiB (at least 96); the lab adds 8 KiB (the QEMU 7.2 TCG workaround)")
	vmStart.Flags().BoolVar(&exactRAM, "exact-ram", false, "no 8 KiB pad: reproduces QEMU 7.2's lost guest writes under TCG")
	vmStart.Flags().StringVar(&disk, "disk-size", "256MiB", "size of the guest's sparse raw disk")
	vm := &cobra.Command{Use: "vm", Short: "Lab guests"}
	vm.AddCommand(vmStart)

	c.AddCommand(up, down, status, vm)
	return c
}

func printLab(w io.Writer, l *lab.Lab) {
	fmt.Fprintf(w, "lab %s (state in %s)\n", l.Name, l.Dir)
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  HOST\tADDRESS\tLINK TO WAN\tENTER WITH")
	for _, h := range []string{lab.Client, lab.DNS, lab.SiteA, lab.SiteB, lab.WAN} {
		addr, link := "", "-"
		if h != lab.WAN {
			addr = lab.Addr(h).String()
			if p, ok := l.State.Links[h]; ok && p != (lab.Profile{}) {
				link = fmt.Sprintf("%v one way", p.Delay)
				if p.Rate > 0 {
					link += ", " + p.Rate.String()
				}
				if p.Loss > 0 {
					link += fmt.Sprintf(", %.2g%% loss", p.Loss*100)
				}
			} else {
				link = "plain veth"
			}
		} else {
			addr = "router"
		}
		state := ""
		if !netns.Exists(l.NS(h)) {
			state = " (MISSING)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\tip netns exec %s bash%s\n", h, addr, link, l.NS(h), state)
	}
	tw.Flush()
	fmt.Fprintf(w, "  VM addresses: old %s (site A), new %s (site B); DNS name %s (was %s) served by %s; TSIG key %s\n",
		lab.OldIP, lab.NewIP, lab.SvcName, lab.OldIP, lab.DNSIP, l.KeyFile())
	for _, site := range []string{lab.SiteA, lab.SiteB} {
		fmt.Fprintf(w, "  vmhopd %s at %s: %s (config %s; as the operator: vmhop --socket %s status)\n",
			labrun.DaemonName(site), site, labrun.DaemonAddr(site), labrun.DaemonConfig(l, site), labrun.DaemonSocket(l, site))
	}
	for _, vm := range l.State.VMs {
		alive := "running"
		if vm.Pid == 0 || syscall.Kill(vm.Pid, 0) != nil {
			alive = "not running"
		}
		fmt.Fprintf(w, "  vm %s on %s: %s, pid %d, QMP %s\n", vm.Name, vm.Host, alive, vm.Pid, vm.Machine.QMPSocket)
	}
}
