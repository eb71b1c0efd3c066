// Package daemon is vmhopd's service layer: the peer API other hosts'
// daemons call over mutual TLS (peer.go: POST /v1/peer/{method}, JSON in
// and out, streams as NDJSON), the local API the vmhop CLI calls over a
// unix socket (local.go), the per-migration secrets handed over between
// them (secrets.go), and the migrations this host runs as the source
// (migrations.go), through a Migrator the migration core supplies.
//
// An interface whose methods take a context and a JSON struct (the
// migration core's destination host) is carried method by method: the
// destination registers each method, the source implements the interface
// with calls, and sentinel errors registered with RegisterError come back
// as themselves:
//
//	// destination host, before Serve
//	daemon.Handle(d.PeerAPI(), "dest.create-image",
//		func(ctx context.Context, from string, req migrator.ImageCreate) (daemon.Empty, error) {
//			return daemon.Empty{}, local.CreateImage(ctx, req)
//		})
//
//	// source host: remoteDest{peer} is a migrator.Destination
//	func (r remoteDest) CreateImage(ctx context.Context, req migrator.ImageCreate) error {
//		_, err := daemon.Call[migrator.ImageCreate, daemon.Empty](ctx, r.peer, "dest.create-image", req)
//		return err
//	}
//
// Data flows cmd -> daemon -> migrator: this package never imports the lab.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/daemon/metrics"
	"github.com/vmhop/vmhop/internal/config"
)

// Options are what New takes besides the config.
type Options struct {
	Log *slog.Logger // nil: slog.Default()
	// Migrator runs the migrations the local API accepts; nil answers
	// migrate with CodeUnavailable.
	Migrator Migrator
	// SocketGroup owns the local API socket when that group exists; ""
	// means "vmhop".
	SocketGroup string
	// PeerDial dials peers' addresses; nil: a net.Dialer with a 10 s timeout.
	PeerDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// StopTimeout bounds how long a stopping daemon waits for its running
	// migrations to undo and return; 0 means 90 s.
	StopTimeout time.Duration
	// Metrics receives the daemon's series, served on metrics_listen;
	// nil: a fresh metrics.New().
	Metrics *metrics.Metrics
	// Level is the log level Log's handler reads; Reload sets it to the
	// new config's log_level. nil: the level is not reloadable.
	Level *slog.LevelVar
	// Ready is called once Serve serves every listener (systemd's
	// READY=1); nil: nothing.
	Ready func()
	// PeerCheckInterval is how often Serve greets every peer to update
	// the vmhop_peer_* gauges (the greeting renews this host's leases on
	// its peers); 0 means 30 s, < 0 never.
	PeerCheckInterval time.Duration
	// LeaseTTL is how long a source peer may stay silent before this
	// host, as its destination, undoes what the peer's migrations made
	// here (Leases); 0 means DefaultLeaseTTL. Keep it above
	// PeerCheckInterval.
	LeaseTTL time.Duration
	// Now is the leases' clock; nil: time.Now (tests move it).
	Now func() time.Time
	// RecoveryRetry is how long Serve waits before it runs Recover again
	// after a recovery failed or a job left its record open (its undo
	// could not reach a host), doubling up to a minute while it fails;
	// 0 means 2 s, < 0 never (an operator runs vmhop recover --apply).
	RecoveryRetry time.Duration
}

// Daemon is one host's vmhopd: its peer API (with tls set), its local API,
// its secrets and its migrations.
type Daemon struct {
	opts    Options
	log     *slog.Logger
	tls     *hostTLS // nil without tls: no peer API
	peerAPI *PeerAPI
	secrets Secrets
	migs    migrations
	metrics *metrics.Metrics
	journal *journal.Store // state_dir/journal: the migrations this host coordinates

	recoverMu   sync.Mutex    // one Recover at a time
	recoverKick chan struct{} // a record was left for recovery: retryRecovery tries soon

	mu     sync.RWMutex // guards cfg.Peers, cfg.LogLevel, peers, reload (Reload changes them)
	cfg    config.Daemon
	peers  map[string]*PeerClient
	reload *ReloadStatus // the last Reload's outcome; nil before any

	peerLn, localLn, metricsLn net.Listener
}

// New builds a daemon from its config: it reads and checks the tls files
// (errors name the key) and prepares a client per configured peer. It
// does not listen yet.
func New(cfg config.Daemon, opts Options) (*Daemon, error) {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.SocketGroup == "" {
		opts.SocketGroup = "vmhop"
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 90 * time.Second
	}
	if opts.PeerCheckInterval == 0 {
		opts.PeerCheckInterval = 30 * time.Second
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.New()
	}
	d := &Daemon{cfg: cfg, opts: opts, log: opts.Log, peers: map[string]*PeerClient{}, metrics: opts.Metrics,
		secrets: Secrets{dir: filepath.Join(cfg.StateDir, "migrations")}, journal: journal.NewStore(journalDir(cfg.StateDir)),
		recoverKick: make(chan struct{}, 1)}
	if cfg.TLS.Cert != "" {
		t, err := loadTLS(&cfg)
		if err != nil {
			return nil, err
		}
		d.tls = t
		for _, p := range cfg.Peers {
			d.peers[p.Name] = newPeerClient(t, p, opts.PeerDial)
		}
	}
	d.peerAPI = &PeerAPI{tls: d.tls, methods: map[string]http.HandlerFunc{}, leases: newLeases(opts.LeaseTTL, opts.Now, opts.Log)}
	Handle(d.peerAPI, "hello", func(ctx context.Context, from string, h Hello) (Hello, error) {
		if err := checkHello(h, from); err != nil {
			return Hello{}, err
		}
		d.log.Info("peer said hello", "peer", from, "version", h.Version)
		return d.hello(), nil
	})
	d.registerSecretMethods()
	return d, nil
}

func (d *Daemon) hello() Hello {
	return Hello{Name: d.cfg.Name, Version: Version, Protocol: ProtocolVersion}
}

// Config is the daemon's config as it stands (after any Reload).
func (d *Daemon) Config() config.Daemon {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.cfg
}

// PeerAPI is the peer API's method table: register the methods other
// hosts call (Handle, HandleStream) before Serve.
func (d *Daemon) PeerAPI() *PeerAPI { return d.peerAPI }

// Metrics is where the migration path records its series (never nil).
func (d *Daemon) Metrics() *metrics.Metrics { return d.metrics }

// Peer is the client of configured peer name (CodeNotFound if there is
// none; CodeUnavailable without tls).
func (d *Daemon) Peer(name string) (*PeerClient, error) {
	if d.tls == nil {
		return nil, Errorf(CodeUnavailable, "no peer API: vmhopd.tls is not set")
	}
	d.mu.RLock()
	c, ok := d.peers[name]
	d.mu.RUnlock()
	if !ok {
		return nil, Errorf(CodeNotFound, "%q is not in vmhopd.peers", name)
	}
	return c, nil
}

// Listen binds the local API's socket (key "socket") and, with tls, the
// peer API's address (key "listen"). Once the socket is bound (no other
// vmhopd runs), it removes the per-migration secrets a previous vmhopd
// left in state_dir/migrations.
func (d *Daemon) Listen() error {
	ln, err := listenSocket(d.cfg.Socket, d.opts.SocketGroup)
	if err != nil {
		return fmt.Errorf("vmhopd.socket: listen on %q: %w", d.cfg.Socket, err)
	}
	d.localLn = ln
	// The socket is ours: no other vmhopd runs, so any secrets left were
	// left by one that died.
	ids, err := d.secrets.sweep()
	if len(ids) > 0 {
		d.log.Warn("removed secrets a previous vmhopd left", "migrations", ids)
	}
	if err != nil {
		d.localLn.Close()
		return fmt.Errorf("vmhopd.state_dir: %w", err)
	}
	if d.cfg.MetricsListen != "" {
		ml, err := net.Listen("tcp", d.cfg.MetricsListen)
		if err != nil {
			d.localLn.Close()
			return fmt.Errorf("vmhopd.metrics_listen: %w", err)
		}
		d.metricsLn = ml
	}
	if d.tls == nil {
		return nil
	}
	pl, err := net.Listen("tcp", d.cfg.Listen)
	if err != nil {
		d.Close()
		return fmt.Errorf("vmhopd.listen: %w", err)
	}
	d.peerLn = pl
	return nil
}

// Close releases what Listen bound, for a daemon that will not Serve.
func (d *Daemon) Close() error {
	var errs []error
	for _, ln := range []net.Listener{d.localLn, d.peerLn, d.metricsLn} {
		if ln != nil {
			errs = append(errs, ln.Close())
		}
	}
	return errors.Join(errs...)
}

// MetricsAddr is the /metrics endpoint's bound address (nil before
// Listen or without metrics_listen).
func (d *Daemon) MetricsAddr() net.Addr {
	if d.metricsLn == nil {
		return nil
	}
	return d.metricsLn.Addr()
}

// PeerAddr is the peer API's bound address (nil before Listen or without tls).
func (d *Daemon) PeerAddr() net.Addr {
	if d.peerLn == nil {
		return nil
	}
	return d.peerLn.Addr()
}

// Serve serves both APIs on what Listen bound until ctx ends; then it
// refuses new migrations, cancels the running ones and waits for them
// (Options.StopTimeout), ends the progress streams, shuts both servers
// down and closes its idle connections to peers. It returns ctx's error
// after a clean stop.
func (d *Daemon) Serve(ctx context.Context) error {
	if d.localLn == nil {
		return errors.New("serve: Listen first")
	}
	base, endStreams := context.WithCancel(context.Background())
	defer endStreams()
	baseCtx := func(net.Listener) context.Context { return base }
	errLog := slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)
	ls := &http.Server{Handler: d.localHandler(), BaseContext: baseCtx, ConnContext: withCaller, ErrorLog: errLog,
		ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	servers := []*http.Server{ls}
	serveErr := make(chan error, 3)
	go func() { serveErr <- ls.Serve(d.localLn) }()
	if d.peerLn != nil {
		mux := http.NewServeMux()
		mux.Handle(peerPath+"{method}", d.peerAPI)
		// ReadHeaderTimeout also bounds the TLS handshake.
		ps := &http.Server{Handler: mux, BaseContext: baseCtx, ErrorLog: errLog, ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout: 2 * time.Minute, TLSConfig: d.tls.server()}
		servers = append(servers, ps)
		go func() { serveErr <- ps.ServeTLS(d.peerLn, "", "") }()
	}
	if d.metricsLn != nil {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", d.metrics.Handler())
		ms := &http.Server{Handler: mux, BaseContext: baseCtx, ErrorLog: errLog, ReadHeaderTimeout: 10 * time.Second,
			IdleTimeout: 2 * time.Minute}
		servers = append(servers, ms)
		go func() { serveErr <- ms.Serve(d.metricsLn) }()
	}
	d.mu.RLock()
	peerNames := slices.Sorted(maps.Keys(d.peers))
	d.mu.RUnlock()
	d.log.Info("vmhopd serving", "socket", d.cfg.Socket, "listen", d.PeerAddr(), "metrics", d.MetricsAddr(), "peers", peerNames)
	if d.opts.Ready != nil {
		d.opts.Ready()
	}
	var bg sync.WaitGroup
	defer bg.Wait()
	if d.tls != nil && d.opts.PeerCheckInterval > 0 {
		bg.Go(func() { d.checkPeersEvery(base, d.opts.PeerCheckInterval) })
	}
	if d.tls != nil {
		bg.Go(func() { d.peerAPI.runLeases(base) })
	}
	if d.opts.RecoveryRetry >= 0 {
		bg.Go(func() { d.retryRecovery(base) })
	}
	var err error
	select {
	case <-ctx.Done():
		err = ctx.Err()
	case err = <-serveErr:
		err = fmt.Errorf("serve: %w", err)
	}
	if !d.migs.stop(d.opts.StopTimeout) {
		d.log.Error("migrations still running at stop", "waited", d.opts.StopTimeout)
	}
	endStreams()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range servers {
		s.Shutdown(sctx)
	}
	d.mu.RLock()
	for _, c := range d.peers {
		c.hc.CloseIdleConnections()
	}
	d.mu.RUnlock()
	return err
}

// Run is Listen then Serve.
func (d *Daemon) Run(ctx context.Context) error {
	if err := d.Listen(); err != nil {
		return err
	}
	return d.Serve(ctx)
}
