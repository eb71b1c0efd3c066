package ddns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/miekg/dns"
)

// Result is what an operation did.
type Result struct {
	Before State `json:"before"`
	After  State `json:"after"`
	// Changed is false when the records already were as asked (operations are idempotent).
	Changed bool `json:"changed"`
	// KeyProved is set by a Prepare that had nothing to change: it sent a
	// signed prerequisite-only UPDATE instead, and the server accepted it.
	KeyProved bool `json:"key_proved,omitempty"`
	// Wait is how long resolvers may still serve Before (its longest TTL):
	// after Prepare, wait this long before relying on the low TTL.
	Wait Seconds `json:"wait_s"`
}

// Seconds is a duration that prints in JSON as seconds.
type Seconds time.Duration

// MarshalJSON implements json.Marshaler.
func (s Seconds) MarshalJSON() ([]byte, error) {
	return []byte(strconv.FormatFloat(time.Duration(s).Seconds(), 'f', -1, 64)), nil
}

func (s Seconds) String() string { return time.Duration(s).String() }

func rrsFor(name string, recs []Record) []dns.RR {
	var out []dns.RR
	for _, r := range recs {
		h := dns.RR_Header{Name: name, Class: dns.ClassINET, Ttl: r.TTL}
		if r.Addr.Is4() {
			h.Rrtype = dns.TypeA
			out = append(out, &dns.A{Hdr: h, A: r.Addr.AsSlice()})
		} else {
			h.Rrtype = dns.TypeAAAA
			out = append(out, &dns.AAAA{Hdr: h, AAAA: r.Addr.AsSlice()})
		}
	}
	return out
}

// BuildReplace returns the UPDATE that changes name's address records from
// `from` to `to` in one message:
//
//   - prerequisites: for A and AAAA, "RRset exists (value dependent)" with
//     exactly from's records of that type, or "RRset does not exist" when
//     from has none (RFC 2136 §2.4.2, §2.4.3);
//   - updates: "Delete an RRset" for each type touched, then "Add to an
//     RRset" with to's records (§2.5.2, §2.5.1).
func BuildReplace(zone, name string, from, to []Record) *dns.Msg {
	zone, name = dns.Fqdn(zone), dns.Fqdn(name)
	m := new(dns.Msg)
	m.SetUpdate(zone)
	toRRs := rrsFor(name, to)
	for _, t := range prerequisites(m, name, from, to) {
		m.RemoveRRset([]dns.RR{&dns.ANY{Hdr: dns.RR_Header{Name: name, Rrtype: t}}})
	}
	m.Insert(toRRs)
	return m
}

// BuildPrerequisites returns a prerequisite-only UPDATE: "RRset exists
// (value dependent)" for name's records recs (RFC 2136 §2.4.2) and an empty
// update section. The server checks the prerequisites and the TSIG and
// changes nothing (§3.2, §3.4); signed, it proves the key works.
func BuildPrerequisites(zone, name string, recs []Record) *dns.Msg {
	zone, name = dns.Fqdn(zone), dns.Fqdn(name)
	m := new(dns.Msg)
	m.SetUpdate(zone)
	prerequisites(m, name, recs, nil)
	return m
}

// prerequisites adds, for A and AAAA when from or to has that type, the
// prerequisite pinning from's RRset of that type, and returns those types.
func prerequisites(m *dns.Msg, name string, from, to []Record) []uint16 {
	var types []uint16
	fromRRs, toRRs := rrsFor(name, from), rrsFor(name, to)
	for _, t := range []uint16{dns.TypeA, dns.TypeAAAA} {
		var f []dns.RR
		touched := false
		for _, rr := range fromRRs {
			if rr.Header().Rrtype == t {
				f = append(f, rr)
			}
		}
		for _, rr := range toRRs {
			touched = touched || rr.Header().Rrtype == t
		}
		if len(f) == 0 && !touched {
			continue
		}
		if len(f) > 0 {
			m.Used(f) // sets class and zero TTL on f's copies (rrsFor made them fresh)
		} else {
			m.RRsetNotUsed([]dns.RR{&dns.ANY{Hdr: dns.RR_Header{Name: name, Rrtype: t}}})
		}
		types = append(types, t)
	}
	return types
}

// replace sends BuildReplace(from, to), signed.
func (c *Client) replace(ctx context.Context, zone, name string, from, to []Record) error {
	return c.update(ctx, zone, name, from, func() *dns.Msg { return BuildReplace(zone, name, from, to) })
}

// prove sends BuildPrerequisites(recs), signed: nothing changes, and an
// error says the key, the server or the records are not as expected.
func (c *Client) prove(ctx context.Context, zone, name string, recs []Record) error {
	return c.update(ctx, zone, name, recs, func() *dns.Msg { return BuildPrerequisites(zone, name, recs) })
}

// update sends the UPDATE build makes, signed, and puts a refusal in words;
// from is what its prerequisites pin.
func (c *Client) update(ctx context.Context, zone, name string, from []Record, build func() *dns.Msg) error {
	r, err := c.exchange(ctx, c.Server, true, build)
	if err != nil {
		return fmt.Errorf("update %s: %w", name, err)
	}
	return c.rcodeError(r, zone, name, from)
}

// rcodeError puts an UPDATE's failure in words (RFC 2136 §2.2, RFC 8945 §5.3).
func (c *Client) rcodeError(r *dns.Msg, zone, name string, from []Record) error {
	var tsigErr uint16
	if t := r.IsTsig(); t != nil {
		tsigErr = t.Error
	}
	e := &UpdateError{Server: c.Server, Rcode: r.Rcode, TSIGError: tsigErr}
	switch {
	case r.Rcode == dns.RcodeSuccess && tsigErr == 0:
		return nil
	case tsigErr == dns.RcodeBadSig:
		e.Msg = fmt.Sprintf("TSIG signature rejected (BADSIG): wrong secret for key %q?", c.Key.Name)
	case tsigErr == dns.RcodeBadKey:
		e.Msg = fmt.Sprintf("TSIG key %q unknown to the server (BADKEY): wrong key name or algorithm?", c.Key.Name)
	case tsigErr == dns.RcodeBadTime:
		e.Msg = "TSIG time outside the allowed window (BADTIME): check both clocks"
	case r.Rcode == dns.RcodeNotAuth:
		e.Msg = fmt.Sprintf("not authoritative for zone %q, or signature not accepted (NOTAUTH)", zone)
	case r.Rcode == dns.RcodeRefused:
		e.Msg = fmt.Sprintf("update refused (REFUSED): zone %q does not allow updates with key %q", zone, c.Key.Name)
	case r.Rcode == dns.RcodeNotZone:
		e.Msg = fmt.Sprintf("%q is not in zone %q (NOTZONE)", name, zone)
	case r.Rcode == dns.RcodeFormatError:
		e.Msg = "server could not parse the update (FORMERR)"
	case r.Rcode == dns.RcodeYXRrset, r.Rcode == dns.RcodeNXRrset, r.Rcode == dns.RcodeNameError, r.Rcode == dns.RcodeYXDomain:
		return fmt.Errorf("%w (%s): %s no longer holds %v: someone else changed it; nothing was written",
			ErrPrerequisite, dns.RcodeToString[r.Rcode], name, addrsOf(from))
	default:
		e.Msg = fmt.Sprintf("update failed (%s)", dns.RcodeToString[r.Rcode])
	}
	return e
}

func addrsOf(rs []Record) []netip.Addr {
	return State{Records: rs}.Addrs()
}

func withTTL(rs []Record, ttl uint32) []Record {
	out := make([]Record, len(rs))
	for i, r := range rs {
		out[i] = Record{r.Addr, ttl}
	}
	return out
}

// uniqueRecords drops records repeated with the same address (the first's
// TTL stays), as a server keeps one record per address.
func uniqueRecords(rs []Record) []Record {
	seen := map[netip.Addr]bool{}
	var out []Record
	for _, r := range rs {
		if !seen[r.Addr] {
			seen[r.Addr] = true
			out = append(out, r)
		}
	}
	return out
}

func sameRecords(a, b []Record) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[Record]int{}
	for _, r := range a {
		seen[r]++
	}
	for _, r := range b {
		if seen[r] == 0 {
			return false
		}
		seen[r]--
	}
	return true
}

// apply moves name from its current records to target(current), verifies
// the change on every authoritative server, and reports it. An update that
// failed its prerequisite because an earlier attempt already applied it
// (a lost answer) counts as done.
func (c *Client) apply(ctx context.Context, zone, name string, target func(cur State) ([]Record, error)) (Result, error) {
	cur, err := c.Show(ctx, zone, name)
	if err != nil {
		return Result{}, err
	}
	to, err := target(cur)
	if err != nil {
		return Result{Before: cur}, err
	}
	res := Result{Before: cur, After: cur, Wait: Seconds(time.Duration(cur.MaxTTL()) * time.Second)}
	if sameRecords(cur.Records, to) {
		return res, nil
	}
	err = c.replace(ctx, zone, name, cur.Records, to)
	if errors.Is(err, ErrPrerequisite) {
		if now, serr := c.Show(ctx, zone, name); serr == nil && sameRecords(now.Records, to) {
			err = nil
		}
	}
	if err != nil {
		return res, err
	}
	res.Changed = true
	after, err := c.Show(ctx, zone, name)
	if err != nil {
		return res, err
	}
	res.After = after
	if !sameRecords(after.Records, to) {
		return res, fmt.Errorf("update %s: primary %s serves %v after a successful update, want %v", name, c.Server, after.Records, to)
	}
	return res, c.VerifyAll(ctx, zone, name, to, after.Serial)
}

// Prepare lowers the TTL of name's address records to ttl ahead of a move.
// Result.Wait is the old TTL: only after that long have resolvers dropped
// copies cached with it.
//
// When no record's TTL is above ttl, nothing needs changing, but Prepare
// still sends one signed UPDATE, prerequisites only (BuildPrerequisites),
// so that a wrong key or a server refusing updates is found now, before a
// migration's commit point, and not at its flip (Result.KeyProved).
func (c *Client) Prepare(ctx context.Context, zone, name string, ttl uint32) (Result, error) {
	res, err := c.apply(ctx, zone, name, func(cur State) ([]Record, error) {
		if len(cur.Records) == 0 {
			return nil, fmt.Errorf("prepare %s: it has no A or AAAA records", name)
		}
		if cur.MaxTTL() <= ttl {
			return cur.Records, nil // already low: nothing to change
		}
		return withTTL(cur.Records, ttl), nil
	})
	if err != nil || res.Changed {
		return res, err
	}
	if err := c.prove(ctx, zone, name, res.Before.Records); err != nil {
		return res, fmt.Errorf("prepare %s: the TTL is already %d s, but the signed check that nothing changed failed: %w", name, res.Before.MaxTTL(), err)
	}
	res.KeyProved = true
	return res, nil
}

// Flip replaces name's addresses, which must be exactly old, with new at
// ttl. If they already are new, nothing is sent. Result.Before is what
// Rollback needs.
//
// Addresses given twice count once: the server keeps one record per address
// (an RRset has no duplicates, RFC 2181 §5), so that is what is verified.
func (c *Client) Flip(ctx context.Context, zone, name string, old, new []netip.Addr, ttl uint32) (Result, error) {
	old, new = sortAddrs(old), sortAddrs(new)
	to := make([]Record, len(new))
	for i, a := range new {
		to[i] = Record{a, ttl}
	}
	return c.apply(ctx, zone, name, func(cur State) ([]Record, error) {
		if sameAddrs(cur.Addrs(), new) {
			return withTTL(cur.Records, ttl), nil
		}
		if !sameAddrs(cur.Addrs(), old) {
			return nil, fmt.Errorf("flip %s: %w: it holds %v, not the expected old %v; nothing was written",
				name, ErrPrerequisite, cur.Addrs(), sortAddrs(old))
		}
		return to, nil
	})
}

// Rollback puts back exactly the records a Flip replaced (before), provided
// the name still holds what the flip wrote (flipped); TTLs are restored too.
func (c *Client) Rollback(ctx context.Context, zone, name string, before []Record, flipped []netip.Addr) (Result, error) {
	before = uniqueRecords(before)
	return c.apply(ctx, zone, name, func(cur State) ([]Record, error) {
		if sameRecords(cur.Records, before) {
			return before, nil
		}
		if !sameAddrs(cur.Addrs(), flipped) {
			return nil, fmt.Errorf("rollback %s: %w: it holds %v, not the flipped %v; nothing was written",
				name, ErrPrerequisite, cur.Addrs(), sortAddrs(flipped))
		}
		return before, nil
	})
}

// Restore raises (or sets) the TTL of name's address records after a move.
func (c *Client) Restore(ctx context.Context, zone, name string, ttl uint32) (Result, error) {
	return c.apply(ctx, zone, name, func(cur State) ([]Record, error) {
		if len(cur.Records) == 0 {
			return nil, fmt.Errorf("restore %s: it has no A or AAAA records", name)
		}
		return withTTL(cur.Records, ttl), nil
	})
}

// ProveKey proves, changing nothing, that the primary accepts this
// client's key for name: it reads the name's records and sends a signed
// UPDATE whose prerequisites are exactly those records and whose update
// section is empty (RFC 2136 §3.2), as `vmhop migrate --dry-run` does. An
// error says whether the key, the server or the records were refused.
func (c *Client) ProveKey(ctx context.Context, zone, name string) error {
	st, err := c.Show(ctx, zone, name)
	if err != nil {
		return err
	}
	return c.prove(ctx, zone, name, st.Records)
}
