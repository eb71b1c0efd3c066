// Command vmhop is the operator's CLI: it checks config files, drives
// migrations, flips DNS, and builds the two-site lab vmhop is tested in.
// Lab commands need root (network namespaces, veths, QEMU taps).
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/lab"
)

// errSilent marks an error whose details were already printed (config check).
var errSilent = errors.New("")

func main() {
	lab.RunChild() // the lab's WAN emulator re-executes this binary
	root := &cobra.Command{
		Use:           "vmhop",
		Short:         "Move a running VM between sites while its IP address changes",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newMigrateCmd(), newConfigCmd(), newDNSCmd(), newLabCmd())
	if err := root.Execute(); err != nil {
		if !errors.Is(err, errSilent) {
			fmt.Fprintln(os.Stderr, "vmhop:", err)
		}
		os.Exit(1)
	}
}
