package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/config"
)

func newConfigCmd() *cobra.Command {
	c := &cobra.Command{Use: "config", Short: "Work with vmhop config files"}
	var verbose bool
	check := &cobra.Command{
		Use:   "check [-v] FILE...",
		Short: "Validate vmhopd or migration config files and print every error",
		Long: "Validate each FILE (a vmhopd config or a migration spec, told apart by its top-level key)\n" +
			"and print every problem as KEY: MESSAGE. Exits 1 if any file has an error.\n\n" +
			"-v also prints every effective value (the file's, or the default) with its unit:\n" +
			"rates in bits and bytes per second, sizes in bytes.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bad := false
			for _, path := range args {
				f, err := config.Load(path)
				var errs config.Errors
				switch {
				case errors.As(err, &errs):
					bad = true
					for _, e := range errs {
						fmt.Fprintf(cmd.ErrOrStderr(), "%s: %s\n", path, e)
					}
				case err != nil:
					bad = true
					fmt.Fprintf(cmd.ErrOrStderr(), "%s: %v\n", path, err)
				default:
					fmt.Fprintf(cmd.OutOrStdout(), "%s: ok (%s config)\n", path, f.Kind())
					if verbose {
						for _, s := range f.Effective() {
							fmt.Fprintf(cmd.OutOrStdout(), "  %s = %s\n", s.Key, s.Value)
						}
					}
				}
			}
			if bad {
				return cli.ErrSilent
			}
			return nil
		},
	}
	check.Flags().BoolVarP(&verbose, "verbose", "v", false, "print every effective value with its unit")
	c.AddCommand(check)
	return c
}
