package ddns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/miekg/dns"
)

// AuthServers returns the servers to check: c.Servers, or the zone's NS set
// with addresses from the primary (additional section, else A/AAAA queries).
func (c *Client) AuthServers(ctx context.Context, zone string) ([]string, error) {
	if len(c.Servers) > 0 {
		return c.Servers, nil
	}
	r, err := c.query(ctx, c.Server, zone, dns.TypeNS)
	if err != nil {
		return nil, err
	}
	glue := map[string][]string{}
	for _, rr := range r.Extra {
		switch v := rr.(type) {
		case *dns.A:
			glue[v.Hdr.Name] = append(glue[v.Hdr.Name], v.A.String())
		case *dns.AAAA:
			glue[v.Hdr.Name] = append(glue[v.Hdr.Name], v.AAAA.String())
		}
	}
	var out []string
	for _, rr := range r.Answer {
		ns, ok := rr.(*dns.NS)
		if !ok {
			continue
		}
		addrs := glue[ns.Ns]
		if len(addrs) == 0 {
			for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
				if a, err := c.query(ctx, c.Server, ns.Ns, t); err == nil {
					for _, rr := range a.Answer {
						switch v := rr.(type) {
						case *dns.A:
							addrs = append(addrs, v.A.String())
						case *dns.AAAA:
							addrs = append(addrs, v.AAAA.String())
						}
					}
				}
			}
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("NS %s of %s: no address found", ns.Ns, zone)
		}
		for _, a := range addrs {
			out = append(out, net.JoinHostPort(a, "53"))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("zone %s: no NS records at %s", zone, c.Server)
	}
	return out, nil
}

// serialAtLeast compares SOA serials in RFC 1982 sequence space.
func serialAtLeast(got, want uint32) bool { return int32(got-want) >= 0 }

// VerifyAll waits until every authoritative server serves exactly want for
// name and a zone serial of at least serial, retrying with backoff on stale
// answers, timeouts and SERVFAIL, within c.VerifyTimeout.
func (c *Client) VerifyAll(ctx context.Context, zone, name string, want []Record, serial uint32) error {
	timeout := c.VerifyTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	servers, err := c.AuthServers(ctx, zone)
	if err != nil {
		return fmt.Errorf("verify %s: %w", name, err)
	}
	for _, srv := range servers {
		backoff := 50 * time.Millisecond
		for {
			s, err := c.stateAt(ctx, srv, zone, name)
			var ue *UpdateError
			if errors.As(err, &ue) && ue.Rcode != dns.RcodeServerFailure && ue.Rcode != 0 {
				return fmt.Errorf("verify %s: %w", name, err) // REFUSED, NOTAUTH: waiting will not help
			}
			if err == nil && serialAtLeast(s.Serial, serial) && sameRecords(s.Records, want) {
				break
			}
			if ctx.Err() != nil {
				if err == nil {
					err = fmt.Errorf("serves %v at serial %d", s.Records, s.Serial)
				}
				return fmt.Errorf("verify %s: %s did not serve %v at serial >= %d within %s: %v", name, srv, want, serial, timeout, err)
			}
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
		}
	}
	return nil
}
