// Command vmhopd is the vmhop host daemon, one per host (configs/vmhopd.service).
// It serves the peer API other hosts' daemons call (mutual TLS, key
// "listen"; only the configured peers get in), the local API the vmhop CLI
// calls (unix socket, key "socket"), and owns the host's network-continuity
// datapath (eBPF/TC on Linux >= 6.6 with TCX, or userspace continuity:
// proxy/wgpath, a WireGuard tunnel per migration in this process). Needs
// root (CAP_NET_ADMIN, CAP_BPF).
//
// Under systemd (configs/vmhopd.service, Type=notify) it sends READY=1
// once its listeners serve, WATCHDOG=1 every half WatchdogSec, and
// RELOADING=1 / READY=1 around a reload. SIGHUP reloads the config file:
// log_level and peers change in place; a file that does not validate, or
// changes any other key, is refused and the running config kept
// (daemon.Reload).
//
// It runs until SIGINT/SIGTERM, then stops its running migrations (they
// undo what they did), closes both APIs and leaves the pinned datapath in
// place so forwarding outlives a restart; -cleanup removes it.
//
// Migrations: the local API's migrate verb runs a spec from this host (the
// source) to the peer it names (daemon.SourceMigrator); the peer API
// serves this host's destination half to its peers (daemon.HostWork):
// images, destination QEMU, taps, disk streams, datapath entries.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/storage"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/sidecar"
	"github.com/vmhop/vmhop/proxy/wgpath"
)

// flags are vmhopd's command line.
var flags struct {
	config  string // path of the vmhopd YAML config
	check   bool   // validate the config and exit
	cleanup bool   // remove what an earlier vmhopd left (pinned maps and links) and exit
}

func main() {
	flag.StringVar(&flags.config, "config", "/etc/vmhop/vmhopd.yaml", "vmhopd config file")
	flag.BoolVar(&flags.check, "check", false, "validate the config file and exit")
	flag.BoolVar(&flags.cleanup, "cleanup", false, "remove the pinned datapath an earlier vmhopd left, then exit")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "vmhopd: unexpected argument %q\n", flag.Arg(0))
		os.Exit(2)
	}
	if err := run(); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "vmhopd:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg, err := config.LoadDaemon(flags.config)
	if err != nil {
		return fmt.Errorf("--config %s:\n%w", flags.config, err)
	}
	level := new(slog.LevelVar)
	log := newLogger(os.Stderr, cfg, level)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := datapath.Options{LocalIP: cfg.Address, PinDir: cfg.BPFFS}
	if flags.cleanup && !flags.check {
		dp, err := datapath.Load(opts)
		if err != nil {
			return fmt.Errorf("cleanup: %w", err)
		}
		if err := dp.Remove(); err != nil {
			return fmt.Errorf("cleanup: %w", err)
		}
		log.Info("removed the pinned datapath", "pins", cfg.BPFFS)
		return nil
	}
	// daemon.New reads and checks the tls files, so -check catches a
	// certificate that does not name this host or is not from the CA.
	host := &migrator.Host{Name: cfg.Name, Address: cfg.Address, Uplink: cfg.Uplink, PinDir: cfg.BPFFS}
	work := &daemon.HostWork{Host: host, Disks: &storage.LocalDiskServer{Log: log}, StateDir: cfg.StateDir, Ports: cfg.MigrationPorts, Log: log}
	sm := &daemon.SourceMigrator{Work: work}
	d, err := daemon.New(*cfg, daemon.Options{Log: log, Level: level, Migrator: sm, Ready: func() { notify(log, sdReady) }})
	if err != nil {
		return fmt.Errorf("--config %s: %w", flags.config, err)
	}
	if flags.check {
		fmt.Printf("%s: ok\n", flags.config)
		return nil
	}
	if err := d.Listen(); err != nil {
		return err
	}
	sc, err := sidecar.Start(cfg.Datapath, opts, cfg.Uplink, log)
	if err != nil {
		return errors.Join(err, d.Close())
	}
	defer sc.Close()
	sm.D = d
	work.Disks.TLS = d.HostServerTLS()
	work.Register(d.PeerAPI())
	if sc.DP != nil {
		host.UseDatapath(sc.DP)
	}
	host.Continuity = string(sc.Mode) // "userspace": proxy/wgpath per migration
	if sc.Mode == sidecar.Userspace { // tunnels of a vmhopd that stopped died with it
		if gone, err := wgpath.Sweep("", false); len(gone) > 0 || err != nil {
			log.Warn("removed what the previous vmhopd's tunnels left", "removed", gone, "err", err)
		}
	}
	// An incoming migration a killed vmhopd left: remove what it made here.
	if undone, err := work.RecoverIncoming(ctx); len(undone) > 0 || err != nil {
		log.Warn("removed what an incoming migration left when the previous vmhopd stopped", "undone", undone, "err", err)
	}
	if sc.DP != nil {
		d.Metrics().SetDatapath(string(sc.Mode), func() (map[string]uint64, error) { return sc.DP.Totals() })
	} else {
		d.Metrics().SetDatapath(string(sc.Mode), nil)
	}
	log.Info("vmhopd started", "name", cfg.Name, "uplink", cfg.Uplink, "address", cfg.Address, "continuity", sc.Mode)
	// Migrations a killed vmhopd left in the journal: roll back or finish
	// them (beside serving: finishing a drain can take minutes).
	go func() {
		if out, err := d.Recover(ctx); len(out) > 0 || err != nil {
			log.Warn("recovered migrations a previous vmhopd left", "n", len(out), "err", err)
		}
	}()
	go watchdog(ctx, log)
	go reloadOnHangup(ctx, d, log)
	err = d.Serve(ctx)
	notify(log, sdStopping)
	log.Info("vmhopd stopped; the pinned datapath keeps forwarding (vmhopd -cleanup removes it)")
	return err
}
