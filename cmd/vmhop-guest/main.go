// Command vmhop-guest is the workload of the lab's test VM: TCP/UDP echo on
// port 7, an HTTP status page on 80 (counter, uptime, boot id), and a disk
// writer that appends checksummed, sequenced records to /dev/vda so a
// verifier can prove no acknowledged write was lost in a migration.
// It runs as the guest's init's last step; it is not meant for hosts.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmhop/vmhop/internal/guest"
)

func main() {
	cfg := guest.DefaultAgentConfig()
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		if err := cfg.ParseCmdline(string(b)); err != nil {
			fmt.Fprintln(os.Stderr, "vmhop-guest:", err)
			os.Exit(2)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	a, err := guest.NewAgent(cfg)
	if err == nil {
		err = a.Run(ctx)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmhop-guest:", err)
		os.Exit(1)
	}
}
