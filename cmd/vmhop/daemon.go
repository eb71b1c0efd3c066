package main

import (
	"encoding/json"
	"fmt"
	"github.com/vmhop/vmhop/internal/cli"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/daemon"
)

// newStatusCmd and newPeersCmd ask this host's vmhopd over its local API.
func newStatusCmd() *cobra.Command {
	var socket string
	var asJSON bool
	c := &cobra.Command{
		Use:   "status [ID]",
		Short: "Show this host's vmhopd (name, version, peers, migrations), or one migration",
		Long: "Without ID: this host's vmhopd, its peers and its running and recent migrations.\n" +
			"With ID: that migration's state, phase, journal state and last progress of each stream.\n\n" +
			"Exit codes: 0 shown; 1 vmhopd cannot be reached or has no such migration; 2 bad flags.",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := cli.SignalContext()
			defer stop()
			if len(args) == 1 {
				m, err := daemon.NewLocalClient(socket).Migration(ctx, args[0])
				if err != nil {
					return err
				}
				if asJSON {
					return printJSON(cmd, m)
				}
				printMigration(cmd.OutOrStdout(), m)
				return nil
			}
			s, err := daemon.NewLocalClient(socket).Status(ctx)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				return printJSON(cmd, s)
			}
			listen := s.Listen
			if listen == "" {
				listen = "(none: no tls)"
			}
			fmt.Fprintf(out, "vmhopd %s (%s, peer protocol %d), peer API %s, peers %v\n", s.Name, s.Version, s.Protocol, listen, s.Peers)
			if s.Reload != nil && !s.Reload.Applied {
				fmt.Fprintf(out, "last config reload refused at %s (running config kept):\n%s\n", s.Reload.At.Format(time.RFC3339), s.Reload.Error)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MIGRATION\tVM\tSTATE\tSTARTED\tBY UID\tPHASE\tERROR")
			for _, m := range s.Migrations {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", m.ID, m.VM, m.State, m.Started.Format("2006-01-02 15:04:05"), m.Caller.UID, dash(m.Phase), m.Error)
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func newPeersCmd() *cobra.Command {
	var socket string
	var asJSON bool
	c := &cobra.Command{
		Use:   "peers",
		Short: "Dial and greet each peer of this host's vmhopd: reachable, authenticated (mutual TLS + hello), version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := cli.SignalContext()
			defer stop()
			ps, err := daemon.NewLocalClient(socket).Peers(ctx)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd, ps)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PEER\tADDRESS\tREACHABLE\tAUTHENTICATED\tVERSION\tHELLO\tERROR")
			for _, p := range ps {
				fmt.Fprintf(tw, "%s\t%s\t%v\t%v\t%s\t%.1fms\t%s\n", p.Name, p.Address, p.Reachable, p.Authenticated, p.Version, p.HelloMillis, p.Error)
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&socket, "socket", defaultSocket, "vmhopd's local API socket")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func printJSON(cmd *cobra.Command, v any) error {
	e := json.NewEncoder(cmd.OutOrStdout())
	e.SetIndent("", "  ")
	return e.Encode(v)
}
