package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/config"
)

// The sd_notify(3) states vmhopd sends on $NOTIFY_SOCKET.
const (
	sdReady     = sd.SdNotifyReady     // "READY=1": listeners serve
	sdStopping  = sd.SdNotifyStopping  // "STOPPING=1"
	sdReloading = sd.SdNotifyReloading // "RELOADING=1": a SIGHUP reload starts (READY=1 ends it)
	sdWatchdog  = sd.SdNotifyWatchdog  // "WATCHDOG=1": alive, within WatchdogSec
)

// newLogger is vmhopd's logger on w: log_format "json" (one JSON object a
// line, slog.JSONHandler) or "text" (key=value, slog.TextHandler), at
// level, which starts at log_level and changes on reload.
func newLogger(w io.Writer, cfg *config.Daemon, level *slog.LevelVar) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(cfg.LogLevel)) // validated by config
	level.Set(l)
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// notify sends state to systemd; without $NOTIFY_SOCKET (not under a
// Type=notify unit) it does nothing.
func notify(log *slog.Logger, state string) {
	if _, err := sd.SdNotify(false, state); err != nil {
		log.Warn("sd_notify failed", "state", state, "err", err)
	}
}

// watchdog sends WATCHDOG=1 every half of the interval systemd asks for
// ($WATCHDOG_USEC, set by WatchdogSec= for this process) until ctx ends;
// without it, it returns at once.
func watchdog(ctx context.Context, log *slog.Logger) {
	interval, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("systemd watchdog: bad environment", "err", err)
		return
	}
	if interval == 0 {
		return
	}
	log.Debug("systemd watchdog on", "interval", interval)
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	for {
		notify(log, sdWatchdog)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// reloadOnHangup reloads the config file on each SIGHUP until ctx ends,
// telling systemd (RELOADING=1, then READY=1 whether it applied or not:
// a refused reload leaves vmhopd running on its old config).
func reloadOnHangup(ctx context.Context, d *daemon.Daemon, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			notify(log, sdReloading)
			d.Reload(flags.config) // logs and records a refusal
			notify(log, sdReady)
		}
	}
}
