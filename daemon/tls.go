package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"

	"github.com/vmhop/vmhop/internal/config"
)

// hostTLS is this host's identity on the peer API and what it trusts: its
// certificate and key (tls.cert, tls.key), the CA pool (tls.ca) and the
// configured peers.
type hostTLS struct {
	cert  tls.Certificate
	roots *x509.CertPool

	mu    sync.RWMutex
	peers []config.Peer // replaced by setPeers on reload
}

// setPeers replaces the peers the handshake lets in: connections opened
// after it are checked against the new list.
func (h *hostTLS) setPeers(peers []config.Peer) {
	h.mu.Lock()
	h.peers = peers
	h.mu.Unlock()
}

// loadTLS reads the tls keys' files and checks that this host's
// certificate names it (key "name") and is signed by the CA. Errors name
// the key at fault.
func loadTLS(cfg *config.Daemon) (*hostTLS, error) {
	pair, err := tls.LoadX509KeyPair(cfg.TLS.Cert, cfg.TLS.Key)
	if err != nil {
		return nil, fmt.Errorf("vmhopd.tls.cert, vmhopd.tls.key: load %q and %q: %w", cfg.TLS.Cert, cfg.TLS.Key, err)
	}
	caPEM, err := os.ReadFile(cfg.TLS.CA)
	if err != nil {
		return nil, fmt.Errorf("vmhopd.tls.ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("vmhopd.tls.ca: %q holds no PEM certificate", cfg.TLS.CA)
	}
	if _, err := pair.Leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: cfg.Name,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, fmt.Errorf("vmhopd.tls.cert: %q is not a certificate for name %q from ca %q (serverAuth and clientAuth): %w",
			cfg.TLS.Cert, cfg.Name, cfg.TLS.CA, err)
	}
	return &hostTLS{cert: pair, roots: roots, peers: cfg.Peers}, nil
}

// errUnlisted refuses a certificate signed by the CA that names no configured peer.
var errUnlisted = errors.New("certificate names no configured peer")

// identify returns the configured peer a verified certificate names: the
// one peer whose name is among the certificate's DNS subjectAltNames. A
// certificate naming no peer, or two, is refused.
func (h *hostTLS) identify(cert *x509.Certificate) (config.Peer, error) {
	var found []config.Peer
	h.mu.RLock()
	defer h.mu.RUnlock()
	for _, p := range h.peers {
		if slices.Contains(cert.DNSNames, p.Name) {
			found = append(found, p)
		}
	}
	switch len(found) {
	case 1:
		return found[0], nil
	case 0:
		return config.Peer{}, fmt.Errorf("%w: DNS names %q", errUnlisted, cert.DNSNames)
	}
	return config.Peer{}, fmt.Errorf("certificate names %d configured peers (%q): refused", len(found), cert.DNSNames)
}

// server is the peer API's TLS: TLS 1.3, a client certificate required and
// verified against the CA, and its identity checked against the peers in
// the handshake (VerifyConnection), so a refused client is cut off before
// any HTTP request is read.
func (h *hostTLS) server() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{h.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    h.roots,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no client certificate")
			}
			_, err := h.identify(cs.PeerCertificates[0])
			return err
		},
	}
}

// client is the TLS to dial peer name with: this host's certificate, the
// CA as the only root, and the server certificate's DNS name checked
// against name.
func (h *hostTLS) client(name string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{h.cert},
		RootCAs:      h.roots,
		ServerName:   name,
	}
}

// HostServerTLS is the server TLS of this host's peer API (nil without
// tls): only configured peers' certificates from the CA get in. The
// destination ends of disk streams use it (storage.LocalDiskServer.TLS).
func (d *Daemon) HostServerTLS() *tls.Config {
	if d.tls == nil {
		return nil
	}
	return d.tls.server()
}

// StreamTLS returns the TLS configs of a data stream between this host and
// configured peer (the disk stream, a migration relay): each end proves
// its own host identity with its certificate. The server side requires a
// client certificate from the CA naming peer; the client side requires a
// server certificate from the CA naming peer. Both are TLS 1.3.
func (d *Daemon) StreamTLS(peer string) (server, client *tls.Config, err error) {
	if _, err := d.Peer(peer); err != nil {
		return nil, nil, err
	}
	h := d.tls
	server = &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{h.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    h.roots,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || !slices.Contains(cs.PeerCertificates[0].DNSNames, peer) {
				return fmt.Errorf("stream: client certificate does not name peer %q", peer)
			}
			return nil
		},
	}
	return server, h.client(peer), nil
}
