// Command vmhopd is the vmhop host daemon, one per host (configs/vmhopd.service).
// It serves the peer API that migrations are driven through and owns the
// host's network-continuity datapath (eBPF/TC on Linux >= 6.6 with TCX, or
// the userspace proxy fallback). Needs root (CAP_NET_ADMIN, CAP_BPF).
//
// This build loads the continuity datapath (or picks the userspace
// fallback) and runs until SIGINT/SIGTERM, leaving the pinned datapath in
// place so forwarding outlives a restart; -cleanup removes it. The peer API
// that carries migrations between hosts is not built yet.
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

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/sidecar"
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
	if flags.check {
		fmt.Printf("%s: ok\n", flags.config)
		return nil
	}
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := datapath.Options{LocalIP: cfg.Address, PinDir: cfg.BPFFS}
	if flags.cleanup {
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
	sc, err := sidecar.Start(cfg.Datapath, opts, cfg.Uplink, log)
	if err != nil {
		return err
	}
	defer sc.Close()
	log.Info("vmhopd started", "uplink", cfg.Uplink, "address", cfg.Address, "continuity", sc.Mode, "listen", cfg.Listen)
	<-ctx.Done()
	log.Info("vmhopd stopping; the pinned datapath keeps forwarding (vmhopd -cleanup removes it)")
	return ctx.Err()
}
