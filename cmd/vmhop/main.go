// Command vmhop is the operator's CLI: it hands migrations to this host's
// vmhopd and follows them (local API, no root needed), makes the TLS
// certificates daemons authenticate each other with, checks config files,
// flips DNS, and builds the two-site lab vmhop is tested in. Lab commands
// need root (network namespaces, veths, QEMU taps).
package main

import (
	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/migrator"
)

func main() {
	root := &cobra.Command{
		Use:   "vmhop",
		Short: "Move a running VM between sites while its IP address changes",
	}
	root.AddCommand(newMigrateCmd(), newStatusCmd(), newAbortCmd(), newHistoryCmd(), newRecoverCmd(), newVersionCmd(), newPeersCmd(), newCertsCmd(), newConfigCmd(), newDNSCmd())
	cli.Main(root, "vmhop", migrator.ExitUsage)
}
