package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmhop/vmhop/internal/config"
)

// ReloadStatus is the outcome of the last config reload (SIGHUP), as the
// status verb reports it.
type ReloadStatus struct {
	At      time.Time `json:"at"`
	Applied bool      `json:"applied"`         // false: refused, the running config kept whole
	Error   string    `json:"error,omitempty"` // why it was refused, naming each key at fault
}

// Reload reads the vmhopd config at path and applies what can change
// while vmhopd runs (systemd's ExecReload sends SIGHUP):
//
//   - log_level: the handler's level (Options.Level) changes at once;
//   - peers: added peers get a client and are let in from the next TLS
//     handshake; a removed peer's client is closed, and its requests are
//     refused (permission_denied) even on a connection it kept open;
//     a peer whose address changed is dialled there from the next call.
//
// Every other key (name, listen, socket, state_dir, uplink, address,
// datapath, bpffs, tls, log_format, metrics_listen, migration_ports) is bound to a
// listener, an identity or the datapath: a change is refused, naming the
// key ("vmhopd.listen: cannot change without a restart"); restart vmhopd
// for it. The certificate files are not re-read either (a rotated
// certificate needs a restart). A file that does not load or validate is
// refused with its errors (each "key: problem"). A refused reload changes
// nothing: all of the file applies, or none of it. The outcome is kept
// for the status verb and counted in vmhop_config_reloads_total.
func (d *Daemon) Reload(path string) error {
	err := d.applyConfig(path)
	st := &ReloadStatus{At: time.Now().UTC(), Applied: err == nil}
	if err != nil {
		st.Error = err.Error()
		d.log.Error("config reload refused: the running config is kept", "config", path, "err", err)
	}
	d.mu.Lock()
	d.reload = st
	d.mu.Unlock()
	d.metrics.Reloaded(err == nil)
	return err
}

func (d *Daemon) applyConfig(path string) error {
	cfg, err := config.LoadDaemon(path)
	if err != nil {
		return fmt.Errorf("reload %s: %w", path, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if bad := fixedChanges(&d.cfg, cfg); len(bad) > 0 {
		return fmt.Errorf("reload %s: %s", path, strings.Join(bad, "; "))
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return fmt.Errorf("reload %s: vmhopd.log_level: %w", path, err) // validated: not reached
	}
	if d.opts.Level != nil {
		d.opts.Level.Set(level)
	}
	if d.tls != nil {
		peers := map[string]*PeerClient{}
		for _, p := range cfg.Peers {
			if c, ok := d.peers[p.Name]; ok && c.Address == p.Address {
				peers[p.Name] = c
			} else {
				peers[p.Name] = newPeerClient(d.tls, p, d.opts.PeerDial)
			}
		}
		for name, c := range d.peers {
			if peers[name] != c {
				c.hc.CloseIdleConnections()
			}
		}
		d.peers = peers
		d.tls.setPeers(cfg.Peers)
	}
	names := make([]string, 0, len(cfg.Peers))
	for _, p := range cfg.Peers {
		names = append(names, p.Name)
	}
	d.metrics.KeepPeers(names)
	d.log.Info("config reloaded", "config", path, "log_level", cfg.LogLevel, "peers", names)
	d.cfg.LogLevel, d.cfg.Peers = cfg.LogLevel, cfg.Peers
	return nil
}

// fixedChanges names each key a reload may not change that differs
// between the running config and the new one.
func fixedChanges(old, cfg *config.Daemon) []string {
	var bad []string
	for _, f := range []struct {
		key      string
		was, now any
	}{
		{"name", old.Name, cfg.Name},
		{"listen", old.Listen, cfg.Listen},
		{"socket", old.Socket, cfg.Socket},
		{"state_dir", old.StateDir, cfg.StateDir},
		{"uplink", old.Uplink, cfg.Uplink},
		{"address", old.Address, cfg.Address},
		{"datapath", old.Datapath, cfg.Datapath},
		{"bpffs", old.BPFFS, cfg.BPFFS},
		{"tls.cert", old.TLS.Cert, cfg.TLS.Cert},
		{"tls.key", old.TLS.Key, cfg.TLS.Key},
		{"tls.ca", old.TLS.CA, cfg.TLS.CA},
		{"log_format", old.LogFormat, cfg.LogFormat},
		{"metrics_listen", old.MetricsListen, cfg.MetricsListen},
		{"migration_ports", old.MigrationPorts, cfg.MigrationPorts},
	} {
		if f.was != f.now {
			bad = append(bad, fmt.Sprintf("vmhopd.%s: cannot change without a restart (running %q, file %q)",
				f.key, fmt.Sprint(f.was), fmt.Sprint(f.now)))
		}
	}
	return bad
}

// configuredPeers is a snapshot of the peers list (it changes on reload).
func (d *Daemon) configuredPeers() []config.Peer {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return slices.Clone(d.cfg.Peers)
}

// checkPeers greets every configured peer at once, each bounded by 5 s,
// and records the results in the vmhop_peer_* gauges.
func (d *Daemon) checkPeers(ctx context.Context) []PeerStatus {
	peers := d.configuredPeers()
	out := make([]PeerStatus, len(peers))
	var wg sync.WaitGroup
	for i, p := range peers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			out[i] = d.checkPeer(ctx, p)
			d.metrics.SetPeer(p.Name, out[i].Reachable, out[i].Authenticated)
		}()
	}
	wg.Wait()
	return out
}

// checkPeersEvery runs checkPeers every interval until ctx ends. The
// first check waits one interval: peers started together are not all up
// at once, and the peers verb measures the first hello on a new connection.
func (d *Daemon) checkPeersEvery(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.checkPeers(ctx)
		}
	}
}
