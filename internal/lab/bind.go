package lab

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/miekg/dns"
)

// The zone the lab's BIND (and Knot) serves: svc points at the VM's old
// address, svc6 at both its old addresses (A and AAAA), svc2 at the
// second VM's old address, with a TTL of SvcTTL.
var zoneText = `$TTL 300
@	IN SOA ns.example. hostmaster.example. ( 1 3600 600 86400 60 )
@	IN NS ns.example.
ns	IN A 10.0.3.2
svc	` + strconv.Itoa(SvcTTL) + `	IN A 10.1.0.10
svc6	` + strconv.Itoa(SvcTTL) + `	IN A 10.1.0.10
svc6	` + strconv.Itoa(SvcTTL) + `	IN AAAA fd00:1::10
svc2	` + strconv.Itoa(SvcTTL) + `	IN A 10.1.0.11
`

// startBIND runs named in the dns namespace, authoritative for Zone, taking
// updates signed with a fresh hmac-sha256 key (written to KeyFile) and
// refusing unsigned ones.
func (l *Lab) startBIND(ctx context.Context) error {
	dir := l.Path("bind")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return err
	}
	key := fmt.Sprintf("key %q {\n\talgorithm hmac-sha256;\n\tsecret %q;\n};\n", KeyName, base64.StdEncoding.EncodeToString(secret))
	if err := os.WriteFile(l.KeyFile(), []byte(key), 0o600); err != nil {
		return err
	}
	conf := fmt.Sprintf(`options {
	directory %[1]q;
	pid-file %[6]q;
	session-keyfile %[7]q;
	managed-keys-directory %[1]q;
	listen-on port 53 { %[2]s; };
	listen-on-v6 { none; };
	recursion no;
	dnssec-validation no;
	notify no;
	allow-transfer { none; };
};
controls { };
include %[3]q;
zone %[4]q {
	type primary;
	file "zone.db";
	allow-update { key %[5]q; };
};
`, dir, DNSIP, l.KeyFile(), Zone, KeyName, dir+"/named.pid", dir+"/session.key")
	if err := os.WriteFile(l.Path("bind", "named.conf"), []byte(conf), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(l.Path("bind", "zone.db"), []byte(zoneText), 0o644); err != nil {
		return err
	}
	// -g: foreground, log to stderr; -4: the lab is IPv4; -n 1: one worker is plenty.
	proc, err := l.startDaemon(DNS, "named.log", nil, "named", "-g", "-4", "-n", "1", "-c", l.Path("bind", "named.conf"))
	if err != nil {
		return err
	}
	return waitFor(ctx, 20*time.Second, func() error {
		if isClosed(proc.Exited()) {
			return fmt.Errorf("named exited: see %s", l.Path("named.log"))
		}
		_, err := l.QueryDNS(DNS, Zone, dns.TypeSOA)
		return err
	})
}

// QueryDNS asks the lab's BIND for name/qtype from inside host's namespace.
func (l *Lab) QueryDNS(host, name string, qtype uint16) (*dns.Msg, error) {
	conn, err := l.Dialer(host)(context.Background(), "udp", net.JoinHostPort(DNSIP.String(), "53"))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	c := &dns.Client{Timeout: 2 * time.Second}
	r, _, err := c.ExchangeWithConn(m, &dns.Conn{Conn: conn})
	if err != nil {
		return nil, err
	}
	if r.Rcode != dns.RcodeSuccess {
		return r, fmt.Errorf("query %s %s: %s", name, dns.TypeToString[qtype], dns.RcodeToString[r.Rcode])
	}
	return r, nil
}
