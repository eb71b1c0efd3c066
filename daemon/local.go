package daemon

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/config"
)

// The local API serves the vmhop CLI on this host over a unix socket
// (config key "socket"; mode 0660, group vmhop), one handler per verb,
// JSON in and out (the shape of tailscale's ipn/localapi):
//
//	GET  /localapi/v0/status                     -> Status
//	GET  /localapi/v0/peers                      -> []PeerStatus (each peer dialled and greeted)
//	POST /localapi/v0/migrate   (a spec's YAML)  -> MigrateResponse
//	GET  /localapi/v0/migrations/{id}/progress   -> stream of Event, the last one with its Result
//	GET  /localapi/v0/migrations/{id}            -> MigrationStatus
//	POST /localapi/v0/migrations/{id}/abort      -> MigrationStatus (the migration undoes)
//	GET  /localapi/v0/history                    -> []HistoryEntry (the journal's finished migrations)
//	GET  /localapi/v0/recover                    -> []RecoveryEntry (what the journal says, what recovery will do)
//	POST /localapi/v0/recover                    -> []RecoveryEntry (recovery run now)
//	POST /localapi/v0/preflight (a spec's YAML)  -> PreflightResponse (changes nothing)
//
// Errors are {"error": {"code", "message"}} as on the peer API.
const localPrefix = "/localapi/v0/"

// Status is what the status verb reports.
type Status struct {
	Name       string            `json:"name"`              // this host's name (config key "name")
	Version    string            `json:"version"`           // vmhopd's build
	Protocol   int               `json:"protocol"`          // the peer API's ProtocolVersion
	Listen     string            `json:"listen,omitempty"`  // the peer API's address; empty without tls
	Peers      []string          `json:"peers"`             // configured peers' names
	Migrations []MigrationStatus `json:"migrations"`        // running and recent, oldest first
	LogLevel   string            `json:"log_level"`         // the running log_level (reloadable)
	Metrics    string            `json:"metrics,omitempty"` // the /metrics endpoint's address; empty without metrics_listen
	Reload     *ReloadStatus     `json:"reload,omitempty"`  // the last config reload (SIGHUP); absent before any
}

// PeerStatus is one configured peer as the peers verb finds it.
type PeerStatus struct {
	Name          string  `json:"name"`
	Address       string  `json:"address"`
	Reachable     bool    `json:"reachable"`     // a TCP connection to its address opened
	Authenticated bool    `json:"authenticated"` // mutual TLS and hello succeeded
	Version       string  `json:"version,omitempty"`
	Protocol      int     `json:"protocol,omitempty"`
	HelloMillis   float64 `json:"hello_ms,omitempty"` // time of the hello call, TLS handshake included
	Error         string  `json:"error,omitempty"`
}

// MigrateResponse is the migrate verb's answer: follow the migration at
// /localapi/v0/migrations/{id}/progress.
type MigrateResponse struct {
	ID string `json:"id"`
}

func (d *Daemon) localHandler() http.Handler {
	mux := http.NewServeMux()
	for _, v := range []struct {
		verb, pattern string
		h             http.HandlerFunc
	}{
		{"status", "GET " + localPrefix + "status", d.serveStatus},
		{"peers", "GET " + localPrefix + "peers", d.servePeers},
		{"migrate", "POST " + localPrefix + "migrate", d.serveMigrate},
		{"progress", "GET " + localPrefix + "migrations/{id}/progress", d.serveProgress},
		{"migration", "GET " + localPrefix + "migrations/{id}", d.serveMigration},
		{"abort", "POST " + localPrefix + "migrations/{id}/abort", d.serveAbort},
		{"history", "GET " + localPrefix + "history", d.serveHistory},
		{"recover-plan", "GET " + localPrefix + "recover", d.serveRecoverPlan},
		{"recover", "POST " + localPrefix + "recover", d.serveRecover},
		{"preflight", "POST " + localPrefix + "preflight", d.servePreflight},
	} {
		mux.Handle(v.pattern, d.metrics.LocalAPI(v.verb, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c := callerOf(r.Context())
			d.log.Debug("local API call", "verb", v.verb, "uid", c.UID, "pid", c.PID)
			v.h(w, r)
		})))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, Errorf(CodeNotFound, "no local API verb %s %s", r.Method, r.URL.Path))
	})
	return mux
}

func (d *Daemon) serveStatus(w http.ResponseWriter, r *http.Request) {
	s := Status{Name: d.cfg.Name, Version: Version, Protocol: ProtocolVersion, Peers: []string{}, Migrations: d.migs.list()}
	if d.peerLn != nil {
		s.Listen = d.peerLn.Addr().String()
	}
	if d.metricsLn != nil {
		s.Metrics = d.metricsLn.Addr().String()
	}
	d.mu.RLock()
	for _, p := range d.cfg.Peers {
		s.Peers = append(s.Peers, p.Name)
	}
	s.LogLevel, s.Reload = d.cfg.LogLevel, d.reload
	d.mu.RUnlock()
	writeJSON(w, s)
}

// servePeers dials and greets every configured peer at once, each bounded by 5 s.
func (d *Daemon) servePeers(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, d.checkPeers(r.Context()))
}

// checkPeer greets peer p: reachable means a TCP connection to its
// address opened (a dial error says not), authenticated that mutual TLS
// and hello succeeded.
func (d *Daemon) checkPeer(ctx context.Context, p config.Peer) PeerStatus {
	st := PeerStatus{Name: p.Name, Address: p.Address}
	c, err := d.Peer(p.Name)
	if err != nil {
		st.Error = err.Error()
		return st
	}
	t0 := time.Now()
	h, err := c.Hello(ctx, d.hello())
	if err != nil {
		var op *net.OpError
		st.Reachable = !errors.As(err, &op) || op.Op != "dial"
		st.Error = err.Error()
		return st
	}
	st.Reachable, st.Authenticated, st.Version, st.Protocol = true, true, h.Version, h.Protocol
	st.HelloMillis = float64(time.Since(t0).Microseconds()) / 1000
	return st
}

// readSpecBody reads and validates a migration spec from a request body.
func readSpecBody(w http.ResponseWriter, r *http.Request) ([]byte, *config.Migration, error) {
	spec, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequest))
	if err != nil {
		return nil, nil, Errorf(CodeInvalidArgument, "read spec: %v", err)
	}
	f, err := config.Parse(spec)
	if err != nil {
		return nil, nil, Errorf(CodeInvalidArgument, "migration spec:\n%v", err)
	}
	if f.Migration == nil {
		return nil, nil, Errorf(CodeInvalidArgument, "migration spec: is a %s config", f.Kind())
	}
	return spec, f.Migration, nil
}

func (d *Daemon) serveMigrate(w http.ResponseWriter, r *http.Request) {
	spec, mspec, err := readSpecBody(w, r)
	if err != nil {
		writeError(w, err)
		return
	}
	if d.opts.Migrator == nil {
		writeError(w, Errorf(CodeUnavailable, "this vmhopd cannot run migrations yet: no migrator is wired in"))
		return
	}
	if err := d.refuseUnrecovered(mspec); err != nil {
		writeError(w, err)
		return
	}
	caller := callerOf(r.Context())
	m, err := d.migs.start(mspec, caller, func(ctx context.Context, m *migration) (any, error) {
		// The record exists before anything is done: a vmhopd killed from
		// here on finds it at its next start (Recover).
		if err := d.openJournal(m, spec); err != nil {
			d.log.Error("migration refused: its journal cannot be written", "id", m.id, "err", err)
			return nil, fmt.Errorf("vmhopd.state_dir: %w", err)
		}
		d.log.Info("migration started", "id", m.id, "vm", m.vm, "uid", caller.UID, "pid", caller.PID)
		rep, err := d.opts.Migrator.Migrate(ctx, &Job{ID: m.id, Spec: mspec, Caller: m.caller, Daemon: d, m: m})
		if err != nil && m.status().AbortRequested {
			err = fmt.Errorf("aborted by vmhop abort: %w", err)
		}
		d.closeJournal(m, err)
		d.log.Info("migration ended", "id", m.id, "err", err)
		return rep, err
	})
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, MigrateResponse{ID: m.id})
}

func (d *Daemon) serveMigration(w http.ResponseWriter, r *http.Request) {
	m, err := d.migs.get(r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	writeJSON(w, m.fullStatus())
}

func (d *Daemon) serveAbort(w http.ResponseWriter, r *http.Request) {
	m, err := d.migs.get(r.PathValue("id"))
	if err == nil {
		err = m.abort()
	}
	if err != nil {
		writeError(w, err)
		return
	}
	c := callerOf(r.Context())
	d.log.Warn("migration abort requested", "id", m.id, "uid", c.UID, "pid", c.PID)
	writeJSON(w, m.fullStatus())
}

func (d *Daemon) serveHistory(w http.ResponseWriter, r *http.Request) {
	h, err := d.History()
	if err != nil && len(h) == 0 {
		writeError(w, Errorf(CodeInternal, "%v", err))
		return
	}
	writeJSON(w, h)
}

func (d *Daemon) serveRecoverPlan(w http.ResponseWriter, r *http.Request) {
	p, err := d.RecoveryPlan()
	if err != nil && len(p) == 0 {
		writeError(w, Errorf(CodeInternal, "%v", err))
		return
	}
	writeJSON(w, p)
}

// serveRecover runs the recovery now; each entry carries its own error.
func (d *Daemon) serveRecover(w http.ResponseWriter, r *http.Request) {
	out, err := d.Recover(r.Context())
	if err != nil {
		d.log.Warn("recover verb", "err", err)
	}
	writeJSON(w, out)
}

// PreflightResponse is the preflight verb's answer: the migration would
// be refused when OK is false (Error says why). Nothing was changed.
type PreflightResponse struct {
	OK     bool            `json:"ok"`
	Error  string          `json:"error,omitempty"`
	Report json.RawMessage `json:"report,omitempty"` // the Preflighter's report
}

func (d *Daemon) servePreflight(w http.ResponseWriter, r *http.Request) {
	_, mspec, err := readSpecBody(w, r)
	if err != nil {
		writeError(w, err)
		return
	}
	pf, ok := d.opts.Migrator.(Preflighter)
	if !ok {
		writeError(w, Errorf(CodeUnavailable, "this vmhopd cannot run a preflight: its migrator has none"))
		return
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	job := &Job{ID: mspec.Name + "-dryrun-" + hex.EncodeToString(rnd[:]), Spec: mspec, Caller: callerOf(r.Context()), Daemon: d}
	rep, perr := pf.Preflight(r.Context(), job)
	resp := PreflightResponse{OK: perr == nil}
	if perr != nil {
		resp.Error = perr.Error()
	}
	if rep != nil {
		if b, jerr := json.Marshal(rep); jerr == nil {
			resp.Report = b
		}
	}
	writeJSON(w, resp)
}

func (d *Daemon) serveProgress(w http.ResponseWriter, r *http.Request) {
	m, err := d.migs.get(r.PathValue("id"))
	if err != nil {
		writeError(w, err)
		return
	}
	s := startStream(w)
	s.end(m.follow(r.Context(), func(ev Event) error { return s.send(ev) }))
}

// Caller is who is at the other end of a local API connection, as the
// kernel says (SO_PEERCRED, socket(7)): kept with each migration it starts.
type Caller struct {
	UID int `json:"uid"`
	GID int `json:"gid"`
	PID int `json:"pid"`
}

type callerKey struct{}

// withCaller is the local server's ConnContext: it reads the peer's
// credentials once per connection. UID -1 means unknown.
func withCaller(ctx context.Context, c net.Conn) context.Context {
	cl := Caller{UID: -1, GID: -1}
	if uc, ok := c.(*net.UnixConn); ok {
		if raw, err := uc.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
					cl = Caller{UID: int(cred.Uid), GID: int(cred.Gid), PID: int(cred.Pid)}
				}
			})
		}
	}
	return context.WithValue(ctx, callerKey{}, cl)
}

func callerOf(ctx context.Context) Caller {
	if c, ok := ctx.Value(callerKey{}).(Caller); ok {
		return c
	}
	return Caller{UID: -1, GID: -1}
}

// LocalClient talks to vmhopd's local API over its unix socket: what the
// vmhop CLI uses. It needs no privilege but access to the socket (root,
// or a member of group vmhop).
type LocalClient struct {
	Socket string
	hc     *http.Client
}

// NewLocalClient returns a client of the vmhopd listening on socket.
func NewLocalClient(socket string) *LocalClient {
	var dialer net.Dialer
	return &LocalClient{Socket: socket, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", socket)
		},
	}}}
}

func (c *LocalClient) call(ctx context.Context, method, verb string, body io.Reader, contentType string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://vmhopd"+localPrefix+verb, body)
	if err != nil {
		return err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if err := do(c.hc, req, out); err != nil {
		return c.wrap(verb, err)
	}
	return nil
}

// wrap says what to do when the socket is missing or closed to the caller.
func (c *LocalClient) wrap(verb string, err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return fmt.Errorf("vmhopd at %s: %s: %w (is vmhopd running? is the user in group vmhop?)", c.Socket, verb, err)
	}
	return fmt.Errorf("vmhopd at %s: %s: %w", c.Socket, verb, err)
}

// Status calls the status verb.
func (c *LocalClient) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.call(ctx, http.MethodGet, "status", nil, "", &s)
}

// Peers calls the peers verb.
func (c *LocalClient) Peers(ctx context.Context) ([]PeerStatus, error) {
	var ps []PeerStatus
	return ps, c.call(ctx, http.MethodGet, "peers", nil, "", &ps)
}

// Migrate hands a migration spec (the YAML file's bytes) to vmhopd, which
// validates it and starts the migration; it returns the migration's ID.
func (c *LocalClient) Migrate(ctx context.Context, spec []byte) (string, error) {
	var r MigrateResponse
	return r.ID, c.call(ctx, http.MethodPost, "migrate", bytes.NewReader(spec), "application/yaml", &r)
}

// Migration calls the migration verb: one migration's status.
func (c *LocalClient) Migration(ctx context.Context, id string) (MigrationStatus, error) {
	var s MigrationStatus
	return s, c.call(ctx, http.MethodGet, "migrations/"+url.PathEscape(id), nil, "", &s)
}

// Abort calls the abort verb: the migration is cancelled and undoes what
// it did (refused past its commit point).
func (c *LocalClient) Abort(ctx context.Context, id string) (MigrationStatus, error) {
	var s MigrationStatus
	return s, c.call(ctx, http.MethodPost, "migrations/"+url.PathEscape(id)+"/abort", nil, "", &s)
}

// History calls the history verb: finished migrations, newest first.
func (c *LocalClient) History(ctx context.Context) ([]HistoryEntry, error) {
	var h []HistoryEntry
	return h, c.call(ctx, http.MethodGet, "history", nil, "", &h)
}

// RecoveryPlan calls the recover verb without applying: what the journal
// says and what recovery would do.
func (c *LocalClient) RecoveryPlan(ctx context.Context) ([]RecoveryEntry, error) {
	var p []RecoveryEntry
	return p, c.call(ctx, http.MethodGet, "recover", nil, "", &p)
}

// Recover calls the recover verb, applying the recovery now.
func (c *LocalClient) Recover(ctx context.Context) ([]RecoveryEntry, error) {
	var p []RecoveryEntry
	return p, c.call(ctx, http.MethodPost, "recover", nil, "", &p)
}

// Preflight hands a spec to vmhopd's preflight: nothing is changed.
func (c *LocalClient) Preflight(ctx context.Context, spec []byte) (PreflightResponse, error) {
	var r PreflightResponse
	return r, c.call(ctx, http.MethodPost, "preflight", bytes.NewReader(spec), "application/yaml", &r)
}

// Follow hands every progress event of migration id to recv, from its
// first, and returns the migration's Result once it ends.
func (c *LocalClient) Follow(ctx context.Context, id string, recv func(Event) error) (*Result, error) {
	verb := "migrations/" + id + "/progress"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://vmhopd"+localPrefix+verb, nil)
	if err != nil {
		return nil, err
	}
	var res *Result
	err = doStream(c.hc, req, func(raw json.RawMessage) error {
		var ev Event
		if err := json.Unmarshal(raw, &ev); err != nil {
			return fmt.Errorf("decode event: %w", err)
		}
		if ev.Result != nil {
			res = ev.Result
		}
		return recv(ev)
	})
	if err != nil {
		return nil, c.wrap(verb, err)
	}
	if res == nil {
		return nil, c.wrap(verb, errors.New("progress ended without a result"))
	}
	return res, nil
}
