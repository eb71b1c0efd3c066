package main

import (
	"encoding/json"
	"errors"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/migrator"
)

func newMigrateCmd() *cobra.Command {
	var file string
	var asJSON, verbose bool
	c := &cobra.Command{
		Use:   "migrate -f MIGRATION.yaml [--name LAB]",
		Short: "Move the lab's guest from site A to site B under a client load; print what the client saw",
		Long: "Run the migration a spec describes in a lab built by `vmhop-lab up`: the hosts are the lab's\n" +
			"namespaces and the VM is the lab's guest at site A. A client load runs all along (4 echo\n" +
			"connections at 100 Hz, a new HTTP connection by name every 50 ms, ICMP every 10 ms), tcpdump\n" +
			"captures the client's interface, and after the move the guest is asked whether it survived\n" +
			"intact (same boot, RAM and disk verifiers clean). Exit codes as `vmhop migrate`'s; a guest\n" +
			"that did not survive exits 1.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return cli.WithExit(migrator.ExitUsage, errors.New("-f: required: the migration spec"))
			}
			spec, err := config.LoadMigration(file)
			if err != nil {
				return cli.WithExit(migrator.ExitUsage, err)
			}
			name, _ := cmd.Flags().GetString("name")
			l, err := lab.Open(name)
			if err != nil {
				return err
			}
			level := slog.LevelWarn
			if verbose {
				level = slog.LevelInfo
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
			ctx, stop := cli.SignalContext()
			defer stop()
			out, err := labrun.Migrate(ctx, l, spec, log)
			if asJSON {
				e := json.NewEncoder(cmd.OutOrStdout())
				e.SetIndent("", "  ")
				e.Encode(out)
			} else {
				out.Print(cmd.OutOrStdout())
			}
			return cli.WithExit(migrator.ExitCode(err), err)
		},
	}
	c.Flags().StringVarP(&file, "file", "f", "", "migration spec (see configs/lab-migration.yaml)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	c.Flags().BoolVarP(&verbose, "verbose", "v", false, "log each phase")
	return c
}
