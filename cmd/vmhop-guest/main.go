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

	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/guest"
)

// maxFiles is the agent's descriptor limit: the kernel gives init 1024
// (4096 hard), and every client connection holds one; a load of a few
// thousand connections must not run the guest out of them.
const maxFiles = 1 << 16

func main() {
	cfg := guest.DefaultAgentConfig()
	if b, err := os.ReadFile("/proc/cmdline"); err == nil {
		if err := cfg.ParseCmdline(string(b)); err != nil {
			fmt.Fprintln(os.Stderr, "vmhop-guest:", err)
			os.Exit(2)
		}
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: maxFiles, Max: maxFiles}); err != nil {
		fmt.Fprintln(os.Stderr, "vmhop-guest: raise the descriptor limit:", err)
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
