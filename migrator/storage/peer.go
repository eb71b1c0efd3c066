package storage

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// peerTLS is the per-migration identity both hosts' ends of a storage
// connection hold: one self-signed certificate, the only one either end
// accepts (mutual TLS 1.3, the way both QEMUs hold one pre-shared key).
type peerTLS struct {
	cert tls.Certificate
	pool *x509.CertPool
}

const peerName = "vmhop-migration"

// Identity is a per-migration certificate and its key as they cross to
// the other host (PEM): the one side that makes it hands it over the peer
// channel; both ends of a disk stream then hold and pin it. A secret:
// stored 0600 if stored at all, dropped after the migration.
type Identity struct {
	CertPEM []byte `json:"cert_pem"`
	KeyPEM  []byte `json:"key_pem"`
}

// identity exports p.
func (p *peerTLS) identity() (Identity, error) {
	der, err := x509.MarshalPKCS8PrivateKey(p.cert.PrivateKey)
	if err != nil {
		return Identity{}, err
	}
	return Identity{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: p.cert.Certificate[0]}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
	}, nil
}

// empty says whether id carries nothing: the ends then prove their own
// host identities (Relay.TLS, ChunkedSync.TLS, LocalDiskServer.TLS).
func (id Identity) empty() bool { return len(id.CertPEM) == 0 && len(id.KeyPEM) == 0 }

// serverTLS is the destination end's TLS for a request carrying id: the
// per-migration identity's, or the host's own (host) when id is empty.
func (id Identity) serverTLS(host *tls.Config) (*tls.Config, error) {
	if id.empty() {
		if host == nil {
			return nil, errors.New("storage identity: none in the request, and this host has no TLS of its own")
		}
		return host, nil
	}
	p, err := id.peerTLS()
	if err != nil {
		return nil, err
	}
	return p.server(), nil
}

// peerTLS imports id.
func (id Identity) peerTLS() (*peerTLS, error) {
	if len(id.CertPEM) == 0 || len(id.KeyPEM) == 0 {
		return nil, errors.New("storage identity: no certificate or key")
	}
	cert, err := tls.X509KeyPair(id.CertPEM, id.KeyPEM)
	if err != nil {
		return nil, fmt.Errorf("storage identity: %w", err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("storage identity: %w", err)
		}
	}
	p := &peerTLS{cert: cert, pool: x509.NewCertPool()}
	p.pool.AddCert(cert.Leaf)
	return p, nil
}

func newPeerTLS() (*peerTLS, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: peerName},
		DNSNames: []string{peerName}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &peerTLS{pool: x509.NewCertPool(), cert: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: c}}
	p.pool.AddCert(c)
	return p, nil
}

func (p *peerTLS) server() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.cert}, ClientCAs: p.pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}
}

func (p *peerTLS) client() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.cert}, RootCAs: p.pool, ServerName: peerName, MinVersion: tls.VersionTLS13}
}
