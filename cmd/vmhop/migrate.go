package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
)

func newMigrateCmd() *cobra.Command {
	var file, socket string
	var asJSON, dryRun bool
	c := &cobra.Command{
		Use:   "migrate -f MIGRATION.yaml [--dry-run]",
		Short: "Move a running VM to another site through this host's vmhopd: memory, disk and network",
		Long: "Run the migration a spec describes. Limits, DNS and drain settings come from the spec.\n\n" +
			"Without --lab the spec goes to this host's vmhopd (the source host's: --socket), which runs\n" +
			"the migration with its peer; the command follows its progress and exits with the migration's\n" +
			"exit code (below). It needs no root: only access to the socket (group vmhop). Interrupting\n" +
			"it stops following, not the migration.\n\n" +
			"On a terminal the progress is drawn live (phase, bytes, rate, ETA, disk round, memory pass);\n" +
			"otherwise one line per event; --json prints every event as one JSON object a line.\n" +
			"--dry-run runs only the preflight on both hosts (peers, hypervisor and image paths, free\n" +
			"space, datapath, DNS key, addresses) and changes nothing.\n\n" +
			"In the lab, `vmhop-lab migrate` runs a migration with a client load and a disruption report.\n\n" +
			"Exit codes: 0 moved (--dry-run: the preflight passed); 1 failed before the commit point, the\n" +
			"VM runs on the source, its disk intact, DNS unchanged (--dry-run: the preflight refused it);\n" +
			"2 bad flags or spec, nothing attempted; 3 moved, but a follow-up (DNS flip, drain) failed;\n" +
			"4 moved, but the VM does not answer at the destination (health check): the source VM is\n" +
			"kept paused.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return cli.WithExit(migrator.ExitUsage, errors.New("-f: required: the migration spec"))
			}
			if dryRun {
				return preflightViaDaemon(cmd, file, socket, asJSON)
			}
			return migrateViaDaemon(cmd, file, socket, asJSON)
		},
	}
	c.Flags().BoolVar(&dryRun, "dry-run", false, "run the preflight only: change nothing")
	c.Flags().StringVarP(&file, "file", "f", "", "migration spec (see configs/migration.yaml)")
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&asJSON, "json", false, "print every progress event as one JSON object a line")
	return c
}

// defaultSocket is vmhopd's default local API socket (config key vmhopd.socket).
var defaultSocket = config.DefaultDaemon().Socket

// migrateViaDaemon hands the spec file to vmhopd and follows the migration
// to its end: nil if it succeeded, an error saying why if not, carrying
// the migration's exit code (migrator.ExitCode, computed by vmhopd).
func migrateViaDaemon(cmd *cobra.Command, file, socket string, asJSON bool) error {
	spec, err := os.ReadFile(file)
	if err != nil {
		return cli.WithExit(migrator.ExitUsage, fmt.Errorf("-f: %w", err))
	}
	if _, err := config.LoadMigration(file); err != nil {
		return cli.WithExit(migrator.ExitUsage, err) // checked here too, so errors name the file's keys before vmhopd is asked
	}
	ctx, stop := cli.SignalContext()
	defer stop()
	lc := daemon.NewLocalClient(socket)
	id, err := lc.Migrate(ctx, spec)
	if daemon.CodeOf(err) == daemon.CodeInvalidArgument {
		return cli.WithExit(migrator.ExitUsage, err)
	}
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if !asJSON {
		fmt.Fprintf(out, "migration %s started by vmhopd\n", id)
	}
	enc := json.NewEncoder(out)
	var live *liveView
	if !asJSON && isTerminal(out) {
		live = newLiveView(out)
	}
	res, err := lc.Follow(ctx, id, func(ev daemon.Event) error {
		switch {
		case asJSON:
			return enc.Encode(ev)
		case live != nil:
			live.event(ev)
		default:
			printEvent(out, ev)
		}
		return nil
	})
	if live != nil {
		live.finish()
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		return fmt.Errorf("stopped following migration %s; it goes on in vmhopd (vmhop status)", id)
	}
	if err != nil {
		return err
	}
	if !res.OK {
		code := res.ExitCode
		if code == migrator.ExitMoved {
			code = migrator.ExitAborted
		}
		return cli.WithExit(code, fmt.Errorf("migration %s failed after %s: %s", id, res.Duration.Round(time.Millisecond), res.Error))
	}
	return nil
}

// preflightViaDaemon hands the spec to vmhopd's preflight: nil if it
// passed; exit 1 (ExitAborted: nothing was done) with its reason if not.
func preflightViaDaemon(cmd *cobra.Command, file, socket string, asJSON bool) error {
	spec, err := os.ReadFile(file)
	if err != nil {
		return cli.WithExit(migrator.ExitUsage, fmt.Errorf("-f: %w", err))
	}
	if _, err := config.LoadMigration(file); err != nil {
		return cli.WithExit(migrator.ExitUsage, err)
	}
	ctx, stop := cli.SignalContext()
	defer stop()
	r, err := daemon.NewLocalClient(socket).Preflight(ctx, spec)
	if daemon.CodeOf(err) == daemon.CodeInvalidArgument {
		return cli.WithExit(migrator.ExitUsage, err)
	}
	if err != nil {
		return err
	}
	if asJSON {
		if err := printJSON(cmd, r); err != nil {
			return err
		}
	} else {
		out := cmd.OutOrStdout()
		if r.OK {
			fmt.Fprintf(out, "preflight of %s passed: nothing was changed\n", file)
		}
		if len(r.Report) > 0 {
			var v any
			if json.Unmarshal(r.Report, &v) == nil {
				b, _ := json.MarshalIndent(v, "", "  ")
				fmt.Fprintf(out, "report:\n%s\n", b)
			}
		}
	}
	if !r.OK {
		return cli.WithExit(migrator.ExitAborted, fmt.Errorf("preflight refused the migration (nothing was changed): %s", r.Error))
	}
	return nil
}

// printEvent prints one progress event as a line for people; the last
// one, the result, with the migration's report (indented JSON).
func printEvent(w io.Writer, ev daemon.Event) {
	ph := ev.Phase
	if ph == "" {
		ph = "-"
	}
	fmt.Fprintf(w, "%s %-14s %s", ev.Time.Format("15:04:05.000"), ph, ev.Message)
	var d daemon.ProgressData
	if len(ev.Data) > 0 && json.Unmarshal(ev.Data, &d) == nil && d.Kind != "" {
		if ev.Message != "" {
			fmt.Fprint(w, " ")
		}
		fmt.Fprint(w, plainProgress(d))
	} else if len(ev.Data) > 0 {
		fmt.Fprintf(w, " %s", ev.Data)
	}
	fmt.Fprintln(w)
	if r := ev.Result; r != nil && len(r.Report) > 0 {
		var b []byte
		var v any
		if json.Unmarshal(r.Report, &v) == nil {
			b, _ = json.MarshalIndent(v, "", "  ")
		}
		fmt.Fprintf(w, "report:\n%s\n", b)
	}
}
