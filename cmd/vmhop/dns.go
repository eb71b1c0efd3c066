package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/proxy/ddns"
)

// dnsFlags are shared by every `vmhop dns` subcommand; a migration spec
// (-f) supplies defaults that explicit flags override.
type dnsFlags struct {
	file          string
	server        string
	zone, name    string
	keyFile       string
	ttl           uint32
	timeout       time.Duration
	verifyServers []string
	verifyTimeout time.Duration
	inNetns       string
	json          bool
	old, new      []string
	wait          bool
}

func newDNSCmd() *cobra.Command {
	var f dnsFlags
	c := &cobra.Command{
		Use:   "dns",
		Short: "Flip a name to a new address with TSIG-signed RFC 2136 updates",
		Long: "Change a name's A/AAAA records on the zone's primary with one signed UPDATE whose\n" +
			"prerequisites pin the records it replaces (a concurrent change fails it, nothing is\n" +
			"overwritten), then wait until every authoritative server serves the change.\n\n" +
			"A migration: prepare (low TTL; wait the old TTL), flip (new address), restore (high TTL).",
	}
	pf := c.PersistentFlags()
	pf.StringVarP(&f.file, "file", "f", "", "migration spec to take dns.* and network.old_ip/new_ip from")
	pf.StringVar(&f.server, "server", "", "primary accepting updates, host:port (IPv4 or [IPv6])")
	pf.StringVar(&f.zone, "zone", "", "zone apex, e.g. example.")
	pf.StringVar(&f.name, "name", "", "name to change, e.g. svc.example.")
	pf.StringVar(&f.keyFile, "key-file", "", "BIND-format TSIG key file (key \"name\" { algorithm ...; secret \"...\"; };)")
	pf.Uint32Var(&f.ttl, "ttl", 0, "TTL to set in seconds (prepare, flip: default the spec's dns.ttl or 5; restore: required)")
	pf.DurationVar(&f.timeout, "timeout", 5*time.Second, "timeout of each DNS exchange")
	pf.StringSliceVar(&f.verifyServers, "verify-servers", nil, "authoritative servers to check after a change (host:port,...); default: the zone's NS set")
	pf.DurationVar(&f.verifyTimeout, "verify-timeout", 30*time.Second, "how long every authoritative server may take to serve a change")
	pf.StringVar(&f.inNetns, "netns", "", "send DNS traffic from this network namespace (e.g. a lab host: vh-lab-client)")
	pf.BoolVar(&f.json, "json", false, "print the result as JSON")

	show := &cobra.Command{
		Use:   "show",
		Short: "Print the name's A/AAAA records and the zone serial as the primary serves them",
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.run(cmd, func(ctx context.Context, c *ddns.Client) (any, error) {
				return c.Show(ctx, f.zone, f.name)
			})
		},
	}
	prepare := &cobra.Command{
		Use:   "prepare",
		Short: "Lower the records' TTL before a migration; prints how long to wait (the old TTL)",
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.run(cmd, func(ctx context.Context, c *ddns.Client) (any, error) {
				res, err := c.Prepare(ctx, f.zone, f.name, f.ttl)
				if err == nil && f.wait && res.Wait > 0 {
					fmt.Fprintf(cmd.ErrOrStderr(), "waiting %s for caches to drop the old TTL\n", res.Wait)
					select {
					case <-ctx.Done():
						return res, ctx.Err()
					case <-time.After(time.Duration(res.Wait)):
					}
				}
				return res, err
			})
		},
	}
	prepare.Flags().BoolVar(&f.wait, "wait", false, "after lowering, wait the old TTL")
	flip := &cobra.Command{
		Use:   "flip",
		Short: "Replace the name's address (which must be --old) with --new at the low TTL",
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.run(cmd, func(ctx context.Context, c *ddns.Client) (any, error) {
				old, nw, err := f.addrs()
				if err != nil {
					return nil, err
				}
				return c.Flip(ctx, f.zone, f.name, old, nw, f.ttl)
			})
		},
	}
	rollback := &cobra.Command{
		Use:   "rollback",
		Short: "Put --old back (at --ttl) where a flip wrote --new",
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.run(cmd, func(ctx context.Context, c *ddns.Client) (any, error) {
				old, nw, err := f.addrs()
				if err != nil {
					return nil, err
				}
				before := make([]ddns.Record, len(old))
				for i, a := range old {
					before[i] = ddns.Record{Addr: a, TTL: f.ttl}
				}
				return c.Rollback(ctx, f.zone, f.name, before, nw)
			})
		},
	}
	restore := &cobra.Command{
		Use:   "restore",
		Short: "Set the records' TTL back (--ttl, required) after a migration",
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("ttl") {
				return fmt.Errorf("--ttl: required for restore (the TTL before prepare; prepare printed it)")
			}
			return f.run(cmd, func(ctx context.Context, c *ddns.Client) (any, error) {
				return c.Restore(ctx, f.zone, f.name, f.ttl)
			})
		},
	}
	for _, sub := range []*cobra.Command{flip, rollback} {
		sub.Flags().StringSliceVar(&f.old, "old", nil, "the address(es) the name holds before the flip (default: spec network.old_ip)")
		sub.Flags().StringSliceVar(&f.new, "new", nil, "the address(es) it holds after (default: spec network.new_ip)")
	}
	c.AddCommand(show, prepare, flip, rollback, restore)
	return c
}

func (f *dnsFlags) addrs() (old, nw []netip.Addr, err error) {
	parse := func(flag string, ss []string) ([]netip.Addr, error) {
		if len(ss) == 0 {
			return nil, fmt.Errorf("--%s: required", flag)
		}
		var out []netip.Addr
		for _, s := range ss {
			a, err := netip.ParseAddr(strings.TrimSpace(s))
			if err != nil {
				return nil, fmt.Errorf("--%s: %q is not an IPv4 or IPv6 address", flag, s)
			}
			if !slices.Contains(out, a.Unmap()) { // "--new a,a" is one address
				out = append(out, a.Unmap())
			}
		}
		return out, nil
	}
	if old, err = parse("old", f.old); err != nil {
		return nil, nil, err
	}
	nw, err = parse("new", f.new)
	return old, nw, err
}

// resolve fills unset flags from the spec and checks what every subcommand needs.
func (f *dnsFlags) resolve(cmd *cobra.Command) (*ddns.Client, error) {
	if f.file != "" {
		m, err := config.LoadMigration(f.file)
		if err != nil {
			return nil, err
		}
		set := func(flag string, dst *string, v string) {
			if !cmd.Flags().Changed(flag) {
				*dst = v
			}
		}
		set("server", &f.server, m.DNS.Server)
		set("zone", &f.zone, m.DNS.Zone)
		set("name", &f.name, m.DNS.Name)
		set("key-file", &f.keyFile, m.DNS.TSIGKeyFile)
		if !cmd.Flags().Changed("ttl") {
			f.ttl = m.DNS.TTL
		}
		if !cmd.Flags().Changed("timeout") {
			f.timeout = m.DNS.Timeout
		}
		if len(f.old) == 0 {
			for _, a := range m.Network.OldAddrs() { // A, and AAAA for a dual-stack spec
				f.old = append(f.old, a.String())
			}
		}
		if len(f.new) == 0 {
			for _, a := range m.Network.NewAddrs() {
				f.new = append(f.new, a.String())
			}
		}
	}
	if f.ttl == 0 && !cmd.Flags().Changed("ttl") {
		f.ttl = 5
	}
	for _, req := range []struct{ flag, v string }{{"server", f.server}, {"zone", f.zone}, {"name", f.name}, {"key-file", f.keyFile}} {
		if req.v == "" {
			return nil, fmt.Errorf("--%s: required (or give a migration spec with -f)", req.flag)
		}
	}
	if _, _, err := net.SplitHostPort(f.server); err != nil {
		f.server = net.JoinHostPort(f.server, "53")
	}
	key, err := ddns.LoadKey(f.keyFile)
	if err != nil {
		return nil, err
	}
	c := &ddns.Client{Server: f.server, Key: key, Timeout: f.timeout, Servers: f.verifyServers, VerifyTimeout: f.verifyTimeout}
	if f.inNetns != "" {
		c.Dial = netns.DialFunc(f.inNetns)
	}
	return c, nil
}

func (f *dnsFlags) run(cmd *cobra.Command, op func(context.Context, *ddns.Client) (any, error)) error {
	c, err := f.resolve(cmd)
	if err != nil {
		return err
	}
	ctx, stop := cli.SignalContext()
	defer stop()
	res, err := op(ctx, c)
	if res != nil && (err == nil || f.json) {
		printDNS(cmd.OutOrStdout(), res, f.json)
	}
	return err
}

func printDNS(w io.Writer, v any, asJSON bool) {
	if asJSON {
		e := json.NewEncoder(w)
		e.SetIndent("", "  ")
		e.Encode(v)
		return
	}
	switch r := v.(type) {
	case ddns.State:
		printState(w, "", r)
	case ddns.Result:
		if !r.Changed {
			fmt.Fprintln(w, "unchanged: the records already were as asked")
		}
		if r.KeyProved {
			fmt.Fprintln(w, "key proved: the primary accepted a signed prerequisite-only UPDATE (nothing changed)")
		}
		printState(w, "before: ", r.Before)
		printState(w, "after:  ", r.After)
		if r.Wait > 0 {
			fmt.Fprintf(w, "resolvers may hold the old records for up to %s\n", r.Wait)
		}
	}
}

func printState(w io.Writer, prefix string, s ddns.State) {
	var recs []string
	for _, r := range s.Records {
		recs = append(recs, fmt.Sprintf("%s (ttl %d)", r.Addr, r.TTL))
	}
	if len(recs) == 0 {
		recs = []string{"no address records"}
	}
	fmt.Fprintf(w, "%s%s %s serial %d\n", prefix, s.Name, strings.Join(recs, ", "), s.Serial)
}
