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
			"built yet: without --lab this command only checks the spec.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return errors.New("-f: required: the migration spec")
			}
			spec, err := config.LoadMigration(file)
			if err != nil {
				return err
			}
			if labName == "" {
				return fmt.Errorf("--lab: required for now: migrating between real hosts needs vmhopd's peer API, not built yet (%s is valid)", file)
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
			return err
		},
	}
	c.Flags().StringVarP(&file, "file", "f", "", "migration spec (see configs/migration.yaml)")
	c.Flags().StringVar(&labName, "lab", "", "run in this lab (hosts are its namespaces)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	c.Flags().BoolVarP(&verbose, "verbose", "v", false, "log each phase")
	return c
}
