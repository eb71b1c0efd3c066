// Package cli holds what vmhop's command-line binaries share: the signal
// context, exit codes carried by errors, and the run-and-exit of a cobra
// root. Behaviour lives in the packages the commands wire.
package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// ErrSilent marks an error whose details were already printed (config check).
var ErrSilent = errors.New("")

// ExitError carries the exit code of a command's failure (see
// migrator.ExitCode for a migration's); other errors exit 1.
type ExitError struct {
	Code int
	Err  error
}

func (e ExitError) Error() string { return e.Err.Error() }
func (e ExitError) Unwrap() error { return e.Err }

// WithExit gives err the exit code code (nil stays nil).
func WithExit(code int, err error) error {
	if err == nil {
		return nil
	}
	return ExitError{code, err}
}

// SignalContext is cancelled by SIGINT or SIGTERM.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// Main executes root, prints its error as "prog: error" (unless ErrSilent)
// and exits with the error's code: flag errors exit usageCode.
func Main(root *cobra.Command, prog string, usageCode int) {
	root.SilenceUsage, root.SilenceErrors = true, true
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return WithExit(usageCode, err) })
	if err := root.Execute(); err != nil {
		if !errors.Is(err, ErrSilent) {
			fmt.Fprintln(os.Stderr, prog+":", err)
		}
		code := 1
		var ee ExitError
		if errors.As(err, &ee) {
			code = ee.Code
		}
		os.Exit(code)
	}
}
