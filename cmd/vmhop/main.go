// Command vmhop is the operator's CLI: it hands migrations to this host's
// vmhopd and follows them (local API, no root needed), makes the TLS
// certificates daemons authenticate each other with, checks config files,
// flips DNS, and builds the two-site lab vmhop is tested in. Lab commands
// need root (network namespaces, veths, QEMU taps).
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/migrator"
)

// errSilent marks an error whose details were already printed (config check).
var errSilent = errors.New("")

// exitError carries the exit code of a command's failure (see
// migrator.ExitCode for `vmhop migrate`'s); other errors exit 1.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

// withExit gives err the exit code code (nil stays nil).
func withExit(code int, err error) error {
	if err == nil {
		return nil
	}
	return exitError{code, err}
}

func main() {
	lab.RunChild() // the lab's WAN emulator re-executes this binary
	root := &cobra.Command{
		Use:           "vmhop",
		Short:         "Move a running VM between sites while its IP address changes",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newMigrateCmd(), newStatusCmd(), newPeersCmd(), newCertsCmd(), newConfigCmd(), newDNSCmd(), newLabCmd())
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return withExit(migrator.ExitUsage, err) })
	if err := root.Execute(); err != nil {
		if !errors.Is(err, errSilent) {
			fmt.Fprintln(os.Stderr, "vmhop:", err)
		}
		code := 1
		var ee exitError
		if errors.As(err, &ee) {
			code = ee.code
		}
		os.Exit(code)
	}
}
