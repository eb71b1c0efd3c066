package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
)

// ProtocolVersion is the peer API's version. Two daemons talk only if
// theirs are equal (checked by hello); bump it when a method's request or
// response changes incompatibly. 2: the destination allocates each
// incoming migration's ports (incoming.reserve, incoming.release) and
// keeps concurrent migrations apart by the Vmhop-Migration header.
const ProtocolVersion = 2

// protocolHeader carries the caller's ProtocolVersion on every peer call,
// so a mismatch is refused even by a caller that never said hello.
const protocolHeader = "Vmhop-Protocol"

// Version is vmhopd's build version, reported by hello and status (set
// with -ldflags "-X github.com/vmhop/vmhop/daemon.Version=...").
var Version = "dev"

// peerPath is where the peer API's methods live: POST /v1/peer/{method}.
const peerPath = "/v1/peer/"

// PeerAPI is the method table of the peer API, served over mutual TLS to
// the configured peers only. A method takes a JSON request and answers
// with a JSON response or an Error (Handle), or with a stream of events
// (HandleStream). Register methods before the daemon serves.
type PeerAPI struct {
	tls     *hostTLS
	mu      sync.RWMutex
	methods map[string]http.HandlerFunc
	leases  *Leases              // what each source peer made here (lease.go)
	dest    migrator.Destination // from ServeDestination: expired leases are undone through it
	in      qemu.Incoming        // from ServeIncoming
}

type peerKey struct{}

// peerName is the configured peer a request came from, as its
// certificate names it (set by ServeHTTP).
func peerName(ctx context.Context) string {
	s, _ := ctx.Value(peerKey{}).(string)
	return s
}

func (a *PeerAPI) register(method string, h http.HandlerFunc) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, dup := a.methods[method]; dup {
		panic("daemon: peer method " + method + " registered twice")
	}
	a.methods[method] = h
}

// Handle registers method: fn gets the calling peer's name (from its
// verified certificate) and the decoded request; its response is sent as
// JSON, or its error as an Error (an *Error in its chain keeps its code,
// a sentinel registered with RegisterError gets its code and reason, any
// other error is "internal"). ctx ends when the caller goes away.
func Handle[Req, Resp any](a *PeerAPI, method string, fn func(ctx context.Context, from string, req Req) (Resp, error)) {
	a.register(method, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decodeRequest(w, r, &req); err != nil {
			writeError(w, err)
			return
		}
		resp, err := fn(r.Context(), peerName(r.Context()), req)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, resp)
	})
}

// HandleStream registers a streaming method: fn sends events with send
// (each one written and flushed as a line of the NDJSON stream) and its
// return ends the stream (with its error, if any). An error from send
// means the caller went away.
func HandleStream[Req, Ev any](a *PeerAPI, method string, fn func(ctx context.Context, from string, req Req, send func(Ev) error) error) {
	a.register(method, func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := decodeRequest(w, r, &req); err != nil {
			writeError(w, err)
			return
		}
		s := startStream(w)
		s.end(fn(r.Context(), peerName(r.Context()), req, func(ev Ev) error { return s.send(ev) }))
	})
}

// ServeHTTP serves POST /v1/peer/{method}. The TLS handshake has already
// verified the caller against the CA and the configured peers.
func (a *PeerAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		writeError(w, Errorf(CodePermissionDenied, "no client certificate"))
		return
	}
	peer, err := a.tls.identify(r.TLS.PeerCertificates[0])
	if err != nil {
		writeError(w, Errorf(CodePermissionDenied, "%v", err))
		return
	}
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeError(w, Errorf(CodeInvalidArgument, "method %s: peer API calls are POST", r.Method))
		return
	}
	if v := r.Header.Get(protocolHeader); v != strconv.Itoa(ProtocolVersion) {
		writeError(w, Errorf(CodeFailedPrecondition, "peer %q speaks protocol %q, this host %d (vmhopd %s): run the same vmhop version on both",
			peer.Name, v, ProtocolVersion, Version))
		return
	}
	a.leases.touch(peer.Name) // any call from the peer renews its lease
	method := r.PathValue("method")
	a.mu.RLock()
	h := a.methods[method]
	a.mu.RUnlock()
	if h == nil {
		writeError(w, Errorf(CodeNotFound, "no peer method %q", method))
		return
	}
	mig := r.Header.Get(migrationHeader)
	if !migrationIDRE.MatchString(mig) {
		writeError(w, Errorf(CodeInvalidArgument, "%s %q is not a migration ID", migrationHeader, mig))
		return
	}
	h(w, r.WithContext(asPeer(r.Context(), peer.Name, mig)))
}

// PeerClient calls one configured peer's API, over mutual TLS: this
// host's certificate, the CA as the only root, and the peer's certificate
// checked for its configured name.
type PeerClient struct {
	Name    string // the peer's name (config key peers[].name)
	Address string // host:port of its peer API (peers[].address)
	hc      *http.Client
	// migration is the migration its calls belong to (ForMigration).
	migration string
}

func newPeerClient(h *hostTLS, p config.Peer, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *PeerClient {
	if dial == nil {
		dial = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}).DialContext
	}
	return &PeerClient{Name: p.Name, Address: p.Address, hc: &http.Client{Transport: &http.Transport{
		DialContext:         dial,
		TLSClientConfig:     h.client(p.Name),
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
	}}}
}

func (c *PeerClient) request(ctx context.Context, method string, req any) (*http.Request, error) {
	r, err := newJSONRequest(ctx, http.MethodPost, "https://"+c.Address+peerPath+method, req)
	if err == nil {
		r.Header.Set(protocolHeader, strconv.Itoa(ProtocolVersion))
		if c.migration != "" {
			r.Header.Set(migrationHeader, c.migration)
		}
	}
	return r, err
}

// Call calls method on peer c with req and returns its response. Errors
// read "peer NAME: METHOD: ..." and keep the peer's *Error in their chain.
func Call[Req, Resp any](ctx context.Context, c *PeerClient, method string, req Req) (Resp, error) {
	var resp Resp
	hr, err := c.request(ctx, method, req)
	if err == nil {
		err = do(c.hc, hr, &resp)
	}
	if err != nil {
		return resp, fmt.Errorf("peer %q: %s: %w", c.Name, method, err)
	}
	return resp, nil
}

// CallStream calls streaming method on peer c with req and hands each
// event to recv until the stream ends; recv's error stops it and is
// returned.
func CallStream[Req, Ev any](ctx context.Context, c *PeerClient, method string, req Req, recv func(Ev) error) error {
	hr, err := c.request(ctx, method, req)
	if err == nil {
		err = doStream(c.hc, hr, func(raw json.RawMessage) error {
			var ev Ev
			if err := json.Unmarshal(raw, &ev); err != nil {
				return fmt.Errorf("decode event: %w", err)
			}
			return recv(ev)
		})
	}
	if err != nil {
		return fmt.Errorf("peer %q: %s: %w", c.Name, method, err)
	}
	return nil
}

// Hello is the identity and version exchange (method "hello"): each side
// names itself and its versions.
type Hello struct {
	Name     string `json:"name"`     // the sender's host name, as its certificate names it
	Version  string `json:"version"`  // the sender's build (Version)
	Protocol int    `json:"protocol"` // the sender's ProtocolVersion; must equal the receiver's
}

// checkHello checks what a peer said about itself against what its
// certificate says (name) and this build's protocol.
func checkHello(h Hello, name string) error {
	if h.Name != name {
		return Errorf(CodePermissionDenied, "peer names itself %q, its certificate %q", h.Name, name)
	}
	if h.Protocol != ProtocolVersion {
		return Errorf(CodeFailedPrecondition, "peer %q speaks protocol %d (vmhopd %s), this host %d (vmhopd %s): run the same vmhop version on both",
			name, h.Protocol, h.Version, ProtocolVersion, Version)
	}
	return nil
}

// Hello says hello to peer c as self and checks its answer: the name it
// gives is the one its certificate carries, and its protocol version is
// this host's.
func (c *PeerClient) Hello(ctx context.Context, self Hello) (Hello, error) {
	h, err := Call[Hello, Hello](ctx, c, "hello", self)
	if err != nil {
		return h, err
	}
	if err := checkHello(h, c.Name); err != nil {
		return h, fmt.Errorf("peer %q: hello: %w", c.Name, err)
	}
	return h, nil
}
