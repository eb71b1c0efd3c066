// Command vmhop-lab builds and drives vmhop's two-site lab on one machine
// (network namespaces as sites, a userspace WAN emulator, BIND9, QEMU TCG
// guests) and runs migrations in it under a client load, with a disruption
// report from a packet capture. It is a test bench, not part of the
// product: vmhop and vmhopd never link the lab. Needs root and Linux >= 6.6.
package main

import (
	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/migrator"
)

func main() {
	lab.RunChild() // the lab's WAN emulator re-executes this binary
	root := newLabCmd()
	root.Use = "vmhop-lab"
	root.AddCommand(newMigrateCmd())
	cli.Main(root, "vmhop-lab", migrator.ExitUsage)
}
