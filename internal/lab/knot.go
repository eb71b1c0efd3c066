package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/netns"
)

// KnotPort is where StartKnot's server listens, beside BIND on DNSIP:53.
const KnotPort = 5300

var keyFileRE = regexp.MustCompile(`secret "([^"]+)"`)

// StartKnot runs Knot DNS in the dns namespace on DNSIP:KnotPort with its own
// copy of Zone, accepting updates signed with the lab's key: the same DDNS
// tests then run against a second implementation.
func (l *Lab) StartKnot(ctx context.Context) (netip.AddrPort, error) {
	addr := netip.AddrPortFrom(DNSIP, KnotPort)
	kb, err := os.ReadFile(l.KeyFile())
	if err != nil {
		return addr, err
	}
	m := keyFileRE.FindSubmatch(kb)
	if m == nil {
		return addr, fmt.Errorf("no secret in %s", l.KeyFile())
	}
	dir := l.Path("knot")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return addr, err
	}
	conf := fmt.Sprintf(`server:
    rundir: %[1]q
    listen: %[2]s@%[3]d
    user: root:root
database:
    storage: %[1]q
key:
  - id: %[4]s
    algorithm: hmac-sha256
    secret: %[5]s
acl:
  - id: update
    key: %[4]s
    action: update
template:
  - id: default
    storage: %[1]q
    file: "%%s.zone"
    zonefile-sync: -1
zone:
  - domain: %[6]s
    acl: update
log:
  - target: stderr
    any: info
`, dir, DNSIP, KnotPort, KeyName, m[1], Zone)
	if err := os.WriteFile(l.Path("knot", "knot.conf"), []byte(conf), 0o644); err != nil {
		return addr, err
	}
	if err := os.WriteFile(l.Path("knot", Zone+"zone"), []byte(zoneText), 0o644); err != nil {
		return addr, err
	}
	proc, err := l.startDaemon(DNS, "knot.log", nil, "knotd", "-c", l.Path("knot", "knot.conf"))
	if err != nil {
		return addr, err
	}
	return addr, waitFor(ctx, 20*time.Second, func() error {
		if isClosed(proc.Exited()) {
			return fmt.Errorf("knotd exited: see %s", l.Path("knot.log"))
		}
		conn, err := l.Dialer(DNS)(ctx, "udp", addr.String())
		if err != nil {
			return err
		}
		defer conn.Close()
		q := new(dns.Msg)
		q.SetQuestion(Zone, dns.TypeSOA)
		r, _, err := (&dns.Client{Timeout: time.Second}).ExchangeWithConn(q, &dns.Conn{Conn: conn})
		if err == nil && r.Rcode != dns.RcodeSuccess {
			err = fmt.Errorf("SOA: %s", dns.RcodeToString[r.Rcode])
		}
		return err
	})
}

// Dialer returns a dial function whose sockets live in host's namespace.
func (l *Lab) Dialer(host string) func(ctx context.Context, network, address string) (net.Conn, error) {
	return netns.DialFunc(l.NS(host))
}
