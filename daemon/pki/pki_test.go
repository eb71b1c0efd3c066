package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestIssueVerifiesForBothRoles(t *testing.T) {
	ca, err := NewCA("vmhop test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue("site-a.vmhop", []netip.Addr{netip.MustParseAddr("10.1.0.2")}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM) // the key matches the certificate
	if err != nil {
		t.Fatal(err)
	}
	cert := pair.Leaf
	if cert.Subject.CommonName != "site-a.vmhop" || len(cert.DNSNames) != 1 || cert.DNSNames[0] != "site-a.vmhop" ||
		len(cert.IPAddresses) != 1 || cert.IPAddresses[0].String() != "10.1.0.2" || cert.IsCA {
		t.Fatalf("certificate: CN %q, DNS %v, IP %v, CA %v", cert.Subject.CommonName, cert.DNSNames, cert.IPAddresses, cert.IsCA)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: "site-a.vmhop", KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("verify for usage %v: %v", usage, err)
		}
	}
	other, _ := NewCA("another CA", time.Hour)
	otherRoots := x509.NewCertPool()
	otherRoots.AddCert(other.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: otherRoots}); err == nil {
		t.Error("a certificate verified against another CA")
	}
}

func TestCAFilesRoundTrip(t *testing.T) {
	dir := t.TempDir()
	ca, _ := NewCA("vmhop CA", time.Hour)
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if err := WriteNew(certFile, ca.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteNew(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteNew(keyFile, []byte("x"), 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("overwrite of the CA key: %v, want ErrExist", err)
	}
	if fi, _ := os.Stat(keyFile); fi.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v", fi.Mode())
	}
	back, err := LoadCA(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Cert.Equal(ca.Cert) {
		t.Fatal("certificate changed on the way through its file")
	}
	// The loaded key signs certificates that verify against the original.
	certPEM, _, err := back.Issue("h", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := ParseCertificate(certPEM)
	if err := c.CheckSignatureFrom(ca.Cert); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(keyFile, keyFile); err == nil {
		t.Fatal("a key file loaded as a certificate")
	}
}
