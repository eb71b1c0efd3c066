// Package ddns moves a name to a new address with RFC 2136 dynamic updates
// signed with TSIG (RFC 8945), then checks that every authoritative server of
// the zone serves the change.
//
// Every change is one UPDATE message whose prerequisites (RFC 2136 §2.4.2,
// "RRset exists (value dependent)", and §2.4.3, "RRset does not exist") pin
// the address RRsets the change was computed from, so a concurrent change by
// someone else makes the update fail instead of being overwritten.
package ddns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"time"

	"github.com/miekg/dns"
)

// Client updates and queries one zone's primary.
type Client struct {
	// Server is the primary that accepts updates, as host:port (IPv4 or IPv6).
	Server string
	// Key signs every update.
	Key Key
	// Timeout bounds one exchange; default 5s.
	Timeout time.Duration
	// Servers are the authoritative servers (host:port) checked after an
	// update; empty means the zone's NS set, resolved through Server.
	Servers []string
	// VerifyTimeout bounds the wait for every server to serve a change; default 30s.
	VerifyTimeout time.Duration
	// Dial opens connections; nil uses net.Dialer. Tests reach servers in
	// other network namespaces through it.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// Record is one address record of a name.
type Record struct {
	Addr netip.Addr `json:"addr"`
	TTL  uint32     `json:"ttl"`
}

// State is a name's address records as the primary serves them.
type State struct {
	Zone    string   `json:"zone"`
	Name    string   `json:"name"`
	Records []Record `json:"records"`
	Serial  uint32   `json:"serial"` // the zone's SOA serial
}

// Addrs returns the addresses, sorted.
func (s State) Addrs() []netip.Addr {
	out := make([]netip.Addr, len(s.Records))
	for i, r := range s.Records {
		out[i] = r.Addr
	}
	return sortAddrs(out)
}

// MaxTTL is the longest TTL among the records: how long caches may still hold them.
func (s State) MaxTTL() uint32 {
	var m uint32
	for _, r := range s.Records {
		m = max(m, r.TTL)
	}
	return m
}

func sortAddrs(a []netip.Addr) []netip.Addr {
	a = slices.Clone(a)
	sort.Slice(a, func(i, j int) bool { return a[i].Less(a[j]) })
	return slices.Compact(a)
}

func sameAddrs(a, b []netip.Addr) bool { return slices.Equal(sortAddrs(a), sortAddrs(b)) }

// ErrPrerequisite is returned (wrapped) when the records changed between
// reading and updating them: someone else changed the name; nothing was written.
var ErrPrerequisite = errors.New("prerequisite failed")

// UpdateError is a server's refusal, in words.
type UpdateError struct {
	Server    string
	Rcode     int
	TSIGError uint16 // from the response's TSIG record, if any
	Msg       string
}

func (e *UpdateError) Error() string {
	return fmt.Sprintf("%s: %s", e.Server, e.Msg)
}

func (c *Client) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return 5 * time.Second
}

func (c *Client) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if c.Dial != nil {
		return c.Dial(ctx, network, addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// exchange sends m (built anew per attempt by build, so IDs and TSIG times
// are fresh) to server, and retries timeouts and SERVFAIL with backoff until
// ctx ends or attempts run out.
//
// Transport: UDP, falling back to TCP when the answer is truncated; a signed
// message (an UPDATE) that does not fit in 512 bytes goes over TCP at once,
// as nsupdate does (RFC 1035 §4.2.1: UDP messages are at most 512 bytes
// without EDNS, and UPDATEs are sent without it).
//
// A signed request's answer must be signed by the server with the same key
// (RFC 8945 §5.3): an unsigned answer, or one whose MAC does not verify, is
// an error wrapping ErrAnswerSignature, whatever its rcode. Only an answer
// whose TSIG carries an error (BADSIG, BADKEY, BADTIME: the server could not
// verify the request, so it cannot sign, §5.3.2) is returned unverified, for
// its rcode to be reported.
func (c *Client) exchange(ctx context.Context, server string, sign bool, build func() *dns.Msg) (*dns.Msg, error) {
	network := "udp"
	if sign && c.signedLen(build()) > dns.MinMsgSize {
		network = "tcp"
	}
	backoff := 100 * time.Millisecond
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		if attempt > 0 {
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("%s: %w (last: %v)", server, ctx.Err(), last)
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
		}
		r, err := c.exchangeOnce(ctx, server, network, sign, build())
		if err == nil && r.Truncated && network == "udp" {
			r, err = c.exchangeOnce(ctx, server, "tcp", sign, build())
		}
		if r != nil && r.Rcode == dns.RcodeServerFailure {
			last = fmt.Errorf("%s: server failure (SERVFAIL)", server)
			continue
		}
		if r != nil {
			if sign {
				if err := c.checkAnswerTSIG(server, r, err); err != nil {
					return nil, err
				}
			}
			return r, nil
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			last = fmt.Errorf("%s: no answer within %s", server, c.timeout())
			continue
		}
		return nil, fmt.Errorf("%s: %w", server, err)
	}
	return nil, last
}

// ErrAnswerSignature is returned (wrapped) when the answer to a signed
// request is unsigned or its TSIG does not verify with the client's key: it
// may be forged, so what it says (success included) is not believed.
var ErrAnswerSignature = errors.New("answer not authenticated by TSIG")

// checkAnswerTSIG applies RFC 8945 §5.3 to the answer r of a signed request;
// verr is the verification error miekg/dns returned when reading r.
func (c *Client) checkAnswerTSIG(server string, r *dns.Msg, verr error) error {
	t := r.IsTsig()
	switch {
	case t == nil:
		return fmt.Errorf("%s: %w: the %s answer carries no TSIG; a server holding key %q signs its answers (RFC 8945 §5.3): forged, or not from that server",
			server, ErrAnswerSignature, dns.RcodeToString[r.Rcode], c.Key.Name)
	case t.Error != dns.RcodeSuccess:
		return nil // the server could not verify us: the rcode and TSIG error say why
	case verr != nil:
		return fmt.Errorf("%s: %w: the %s answer's TSIG (key %q) does not verify with our secret for key %q (%v): signed with another secret, or altered on the way",
			server, ErrAnswerSignature, dns.RcodeToString[r.Rcode], t.Hdr.Name, c.Key.Name, verr)
	}
	return nil
}

// signedLen is the wire size of m once signed with c.Key.
func (c *Client) signedLen(m *dns.Msg) int {
	m.SetTsig(c.Key.Name, c.Key.Algorithm, 300, time.Now().Unix())
	buf, _, err := dns.TsigGenerate(m, c.Key.Secret, "", false)
	if err != nil {
		return m.Len() + 256 // a TSIG RR is under 256 bytes; the send reports the error
	}
	return len(buf)
}

func (c *Client) exchangeOnce(ctx context.Context, server, network string, sign bool, m *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout())
	defer cancel()
	conn, err := c.dial(ctx, network, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	cl := &dns.Client{Net: network, Timeout: c.timeout()}
	co := &dns.Conn{Conn: conn, UDPSize: dns.DefaultMsgSize}
	if sign {
		secrets := map[string]string{c.Key.Name: c.Key.Secret}
		cl.TsigSecret, co.TsigSecret = secrets, secrets
		m.SetTsig(c.Key.Name, c.Key.Algorithm, 300, time.Now().Unix())
	} else {
		m.SetEdns0(dns.DefaultMsgSize, false)
	}
	r, _, err := cl.ExchangeWithConnContext(ctx, m, co)
	if r != nil && r.Id != m.Id {
		return nil, fmt.Errorf("answer id %d for query id %d", r.Id, m.Id)
	}
	return r, err
}

// query asks server for name/qtype without recursion.
func (c *Client) query(ctx context.Context, server, name string, qtype uint16) (*dns.Msg, error) {
	r, err := c.exchange(ctx, server, false, func() *dns.Msg {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qtype)
		m.RecursionDesired = false
		return m
	})
	if err != nil {
		return nil, err
	}
	if r.Rcode != dns.RcodeSuccess && r.Rcode != dns.RcodeNameError {
		return r, &UpdateError{Server: server, Rcode: r.Rcode, Msg: fmt.Sprintf("query %s %s: %s", name, dns.TypeToString[qtype], dns.RcodeToString[r.Rcode])}
	}
	return r, nil
}

// stateAt reads name's A and AAAA records and the zone serial from server.
func (c *Client) stateAt(ctx context.Context, server, zone, name string) (State, error) {
	s := State{Zone: dns.Fqdn(zone), Name: dns.Fqdn(name)}
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		r, err := c.query(ctx, server, name, t)
		if err != nil {
			return s, err
		}
		for _, rr := range r.Answer {
			switch v := rr.(type) {
			case *dns.A:
				a, _ := netip.AddrFromSlice(v.A.To4())
				s.Records = append(s.Records, Record{a, v.Hdr.Ttl})
			case *dns.AAAA:
				a, _ := netip.AddrFromSlice(v.AAAA)
				s.Records = append(s.Records, Record{a, v.Hdr.Ttl})
			}
		}
	}
	serial, err := c.serial(ctx, server, zone)
	s.Serial = serial
	return s, err
}

func (c *Client) serial(ctx context.Context, server, zone string) (uint32, error) {
	r, err := c.query(ctx, server, zone, dns.TypeSOA)
	if err != nil {
		return 0, err
	}
	for _, rr := range r.Answer {
		if soa, ok := rr.(*dns.SOA); ok {
			return soa.Serial, nil
		}
	}
	return 0, &UpdateError{Server: server, Msg: fmt.Sprintf("no SOA for %q: is the server authoritative for it?", zone)}
}

// Show returns name's address records from the primary.
func (c *Client) Show(ctx context.Context, zone, name string) (State, error) {
	return c.stateAt(ctx, c.Server, zone, name)
}
