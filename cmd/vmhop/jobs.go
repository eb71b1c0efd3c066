package main

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/migrator"
)

// Job control: abort, history, recover and version, each a call of this
// host's vmhopd's local API.

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printMigration prints one migration's status for people.
func printMigration(w io.Writer, m daemon.MigrationStatus) {
	fmt.Fprintf(w, "migration %s (%s)\n  vm       %s\n  state    %s\n  started  %s by uid %d\n  phase    %s\n  journal  %s\n",
		m.ID, m.Name, m.VM, m.State, m.Started.Format(time.RFC3339), m.Caller.UID, dash(m.Phase), dash(m.Journal))
	if m.AbortRequested {
		fmt.Fprintln(w, "  abort    requested: the migration undoes what it did")
	}
	for _, k := range []string{"disk", "memory"} {
		if d, ok := m.Progress[k]; ok {
			fmt.Fprintf(w, "  %-8s %s\n", k, plainProgress(d))
		}
	}
	if m.Error != "" {
		fmt.Fprintf(w, "  error    %s\n", m.Error)
	}
}

func newAbortCmd() *cobra.Command {
	var socket string
	var wait, asJSON bool
	c := &cobra.Command{
		Use:   "abort ID",
		Short: "Abort a running migration: it undoes what it did and the VM runs on the source",
		Long: "Cancel migration ID in this host's vmhopd. Before the commit point the migration undoes\n" +
			"what it did (the source VM runs, its disk intact, DNS as it was); past it (the VM runs at\n" +
			"the destination) abort is refused. --wait follows the migration to its end.\n\n" +
			"Exit codes: 0 abort requested (--wait: the migration ended; then its own exit code, 1 when\n" +
			"undone); 1 refused (no such migration, ended, or past its commit point) or vmhopd cannot be\n" +
			"reached; 2 bad flags.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := cli.SignalContext()
			defer stop()
			lc := daemon.NewLocalClient(socket)
			m, err := lc.Abort(ctx, args[0])
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if !wait {
				if asJSON {
					return printJSON(cmd, m)
				}
				fmt.Fprintf(out, "abort of %s requested: it undoes what it did (vmhop status %s)\n", m.ID, m.ID)
				return nil
			}
			res, err := lc.Follow(ctx, m.ID, func(daemon.Event) error { return nil })
			if err != nil {
				return err
			}
			if asJSON {
				if err := printJSON(cmd, res); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "migration %s ended after %s: %s\n", res.ID, res.Duration.Round(time.Millisecond), dash(res.Error))
			}
			if !res.OK {
				return cli.WithExit(res.ExitCode, errors.New("migration "+res.ID+" was aborted"))
			}
			return nil
		},
	}
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&wait, "wait", false, "follow the migration until it ended and exit with its code")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func newHistoryCmd() *cobra.Command {
	var socket string
	var asJSON bool
	var last int
	c := &cobra.Command{
		Use:   "history",
		Short: "List the migrations this host coordinated, newest first (from the journal: survives restarts)",
		Long: "List the finished migrations in vmhopd's journal (state_dir/journal): outcome, exit code,\n" +
			"journal state, duration, and whether a restarted vmhopd recovered it.\n\n" +
			"Exit codes: 0 listed; 1 vmhopd cannot be reached; 2 bad flags.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := cli.SignalContext()
			defer stop()
			h, err := daemon.NewLocalClient(socket).History(ctx)
			if err != nil {
				return err
			}
			if last > 0 && len(h) > last {
				h = h[:last]
			}
			if asJSON {
				return printJSON(cmd, h)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MIGRATION\tVM\tSTARTED\tDURATION\tSTATE\tEXIT\tERROR")
			for _, e := range h {
				state := string(e.State)
				if e.Recovered {
					state += " (recovered)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\n", e.ID, e.VM, e.Started.Local().Format("2006-01-02 15:04:05"),
					(time.Duration(e.DurationMS) * time.Millisecond).Round(time.Millisecond), state, e.ExitCode, firstLine(e.Error))
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	c.Flags().IntVarP(&last, "last", "n", 0, "only the N newest (0: all the journal keeps)")
	return c
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + " ..."
	}
	return s
}

func newRecoverCmd() *cobra.Command {
	var socket string
	var apply, asJSON bool
	c := &cobra.Command{
		Use:   "recover [--apply]",
		Short: "Show what the journal says of migrations a killed vmhopd left, and what recovery does",
		Long: "For every migration a vmhopd left unfinished (it was killed, or the host rebooted), show its\n" +
			"journal state, what was done on each host, and the recovery rule's direction and actions\n" +
			"(docs/architecture.md, \"Journal and recovery\"). vmhopd recovers at start; --apply runs the\n" +
			"recovery now.\n\n" +
			"Exit codes: 0 nothing left to recover (--apply: everything recovered); 1 migrations need\n" +
			"recovery (--apply: some could not be recovered, or need an operator) or vmhopd cannot be\n" +
			"reached; 2 bad flags.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := cli.SignalContext()
			defer stop()
			lc := daemon.NewLocalClient(socket)
			var es []daemon.RecoveryEntry
			var err error
			if apply {
				es, err = lc.Recover(ctx)
			} else {
				es, err = lc.RecoveryPlan(ctx)
			}
			if err != nil {
				return err
			}
			if asJSON {
				if err := printJSON(cmd, es); err != nil {
					return err
				}
			} else {
				printRecovery(cmd.OutOrStdout(), es, apply)
			}
			pending := slices.ContainsFunc(es, func(e daemon.RecoveryEntry) bool {
				return !apply || e.Error != "" || e.Recovery.Direction == journal.DirOperator
			})
			if pending {
				return cli.WithExit(migrator.ExitAborted, fmt.Errorf("%d migration(s) need recovery", len(es)))
			}
			return nil
		},
	}
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&apply, "apply", false, "run the recovery now")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func printRecovery(w io.Writer, es []daemon.RecoveryEntry, applied bool) {
	if len(es) == 0 {
		fmt.Fprintln(w, "the journal holds no unfinished migration: nothing to recover")
		return
	}
	verb := "will"
	if applied {
		verb = "did"
	}
	for _, e := range es {
		fmt.Fprintf(w, "migration %s (vm %s, started %s)\n  journal: %s; done: %s\n  recovery %s: %s: %s\n",
			e.ID, e.VM, e.Started.Local().Format("2006-01-02 15:04:05"), e.State, doneFlags(e.Done), verb, e.Recovery.Direction, e.Recovery.Why)
		for i, a := range e.Recovery.Actions {
			fmt.Fprintf(w, "    %d. %s\n", i+1, a)
		}
		if e.Error != "" {
			fmt.Fprintf(w, "  error: %s\n", e.Error)
		}
	}
}

// doneFlags lists the journal's flags that are set.
func doneFlags(d journal.Done) string {
	var s []string
	for _, f := range []struct {
		on   bool
		name string
	}{{d.Datapath, "datapath"}, {d.DNSPrepared, "dns-prepared"}, {d.Destination, "destination"}, {d.Switching, "switching"},
		{d.Committed, "committed"}, {d.HealthPassed, "health-passed"}, {d.HealthFailed, "health-failed"},
		{d.DNSFlipped, "dns-flipped"}, {d.DNSFlipFail, "dns-flip-failed"}, {d.DNSRestored, "dns-restored"},
		{d.SourceStop, "source-stopped"}, {d.Draining, "draining"}, {d.Drained, "drained"}} {
		if f.on {
			s = append(s, f.name)
		}
	}
	if len(s) == 0 {
		return "nothing"
	}
	return strings.Join(s, ", ")
}

// versionInfo is what vmhop version prints as JSON.
type versionInfo struct {
	CLI      string `json:"cli"`
	Daemon   string `json:"daemon,omitempty"`
	Protocol int    `json:"protocol"` // the peer API's version this build speaks
	// DaemonProtocol is the running vmhopd's; DaemonError why it was not asked.
	DaemonProtocol int    `json:"daemon_protocol,omitempty"`
	DaemonError    string `json:"daemon_error,omitempty"`
}

func newVersionCmd() *cobra.Command {
	var socket string
	var asJSON bool
	c := &cobra.Command{
		Use:   "version",
		Short: "Print vmhop's version and, if it answers, this host's vmhopd's",
		Long:  "Exit codes: 0 printed (a vmhopd that does not answer is said, not an error); 2 bad flags.",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := cli.SignalContext()
			defer stop()
			v := versionInfo{CLI: daemon.Version, Protocol: daemon.ProtocolVersion}
			if s, err := daemon.NewLocalClient(socket).Status(ctx); err != nil {
				v.DaemonError = err.Error()
			} else {
				v.Daemon, v.DaemonProtocol = s.Version, s.Protocol
			}
			if asJSON {
				return printJSON(cmd, v)
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "vmhop %s (peer protocol %d)\n", v.CLI, v.Protocol)
			if v.DaemonError != "" {
				fmt.Fprintf(out, "vmhopd: not reached: %s\n", v.DaemonError)
			} else {
				fmt.Fprintf(out, "vmhopd %s (peer protocol %d) at %s\n", v.Daemon, v.DaemonProtocol, socket)
			}
			return nil
		},
	}
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}
