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
	var asJSON bool
	c := &cobra.Command{
		Use:   "migrate -f MIGRATION.yaml",
		Short: "Move a running VM to another site through this host's vmhopd: memory, disk and network",
		Long: "Run the migration a spec describes. Limits, DNS and drain settings come from the spec.\n\n" +
			"Without --lab the spec goes to this host's vmhopd (the source host's: --socket), which runs\n" +
			"the migration with its peer; the command follows its progress and exits with the migration's\n" +
			"exit code (below). It needs no root: only access to the socket (group vmhop). Interrupting\n" +
			"it stops following, not the migration.\n\n" +
			"In the lab, `vmhop-lab migrate` runs a migration with a client load and a disruption report.\n\n" +
			"Exit codes: 0 moved; 1 failed before the commit point, the VM runs on the source, its disk\n" +
			"intact, DNS unchanged; 2 bad flags or spec, nothing attempted; 3 moved, but a follow-up\n" +
			"(DNS flip, drain) failed; 4 moved, but the VM does not answer at the destination (health\n" +
			"check): the source VM is kept paused.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return cli.WithExit(migrator.ExitUsage, errors.New("-f: required: the migration spec"))
			}
			return migrateViaDaemon(cmd, file, socket, asJSON)
		},
	}
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
	res, err := lc.Follow(ctx, id, func(ev daemon.Event) error {
		if asJSON {
			return enc.Encode(ev)
		}
		printEvent(out, ev)
		return nil
	})
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

// printEvent prints one progress event as a line for people; the last
// one, the result, with the migration's report (indented JSON).
func printEvent(w io.Writer, ev daemon.Event) {
	ph := ev.Phase
	if ph == "" {
		ph = "-"
	}
	fmt.Fprintf(w, "%s %-14s %s", ev.Time.Format("15:04:05.000"), ph, ev.Message)
	if len(ev.Data) > 0 {
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
