package storage

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
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
