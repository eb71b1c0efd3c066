package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/migrator"
)

func newMigrateCmd() *cobra.Command {
	var file, labName string
	var asJSON, verbose bool
	c := &cobra.Command{
		Use:   "migrate -f MIGRATION.yaml --lab NAME",
		Short: "Move a running VM to another site: memory, disk and network, with a disruption report",
		Long: "Run the migration a spec describes. Limits, DNS and drain settings come from the spec.\n\n" +
			"--lab NAME runs it in a lab built by `vmhop lab up`: the hosts are the lab's namespaces\n" +
			"and the VM is the lab's guest at site A; a client probes the guest all along and the report\n" +
			"gives the disruption it saw, from a packet capture on its interface.\n\n" +
			"Between real hosts the migrator drives each host through vmhopd's peer API, which is not\n" +
			"built yet: without --lab this command only checks the spec.\n\n" +
			"Exit codes: 0 moved; 1 failed before the commit point, the VM runs on the source, its disk\n" +
			"intact, DNS unchanged; 2 bad flags or spec, nothing attempted; 3 moved, but a follow-up\n" +
			"(DNS flip, drain) failed; 4 moved, but the VM does not answer at the destination (health\n" +
			"check): the source VM is kept paused.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return withExit(migrator.ExitUsage, errors.New("-f: required: the migration spec"))
			}
			spec, err := config.LoadMigration(file)
			if err != nil {
				return withExit(migrator.ExitUsage, err)
			}
			if labName == "" {
				return withExit(migrator.ExitUsage, fmt.Errorf("--lab: required for now: migrating between real hosts needs vmhopd's peer API, not built yet (%s is valid)", file))
			}
			l, err := lab.Open(labName)
			if err != nil {
				return err
			}
			level := slog.LevelWarn
			if verbose {
				level = slog.LevelInfo
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
			ctx, stop := signalContext()
			defer stop()
			out, err := labrun.Migrate(ctx, l, spec, log)
			if asJSON {
				e := json.NewEncoder(cmd.OutOrStdout())
				e.SetIndent("", "  ")
				e.Encode(out)
			} else {
				out.Print(cmd.OutOrStdout())
			}
			return withExit(migrator.ExitCode(err), err)
		},
	}
	c.Flags().StringVarP(&file, "file", "f", "", "migration spec (see configs/migration.yaml)")
	c.Flags().StringVar(&labName, "lab", "", "run in this lab (hosts are its namespaces)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	c.Flags().BoolVarP(&verbose, "verbose", "v", false, "log each phase")
	return c
}
