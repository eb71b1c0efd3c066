package migrator_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/migrator"
)

// echoConn keeps one TCP connection to the guest's echo port busy: every
// 20 ms a numbered line, read back byte for byte. It stops at the first
// error or mismatch and says which.
type echoConn struct {
	name string
	c    net.Conn
	mu   sync.Mutex
	sent int
	err  error
}

func (e *echoConn) run(ctx context.Context) {
	buf := make([]byte, 64)
	for i := 0; ctx.Err() == nil; i++ {
		msg := fmt.Appendf(nil, "%s line %06d ............................\n", e.name, i)
		e.c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := e.c.Write(msg); err != nil {
			e.fail(fmt.Errorf("write %d: %w", i, err))
			return
		}
		if _, err := io.ReadFull(e.c, buf[:len(msg)]); err != nil {
			e.fail(fmt.Errorf("read %d: %w", i, err))
			return
		}
		if !bytes.Equal(buf[:len(msg)], msg) {
			e.fail(fmt.Errorf("line %d came back as %q", i, buf[:len(msg)]))
			return
		}
		e.mu.Lock()
		e.sent++
		e.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *echoConn) fail(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.err = err
}

func (e *echoConn) result() (int, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sent, e.err
}

// TestDualStackMigration moves a dual-stack guest (IPv4 and IPv6) with one
// IPv4 and one IPv6 TCP connection to its echo port in flight: both keep
// echoing byte for byte through the move (the IPv6 one through host A's
// redirect, the tunnel and host B), svc6's A and AAAA records are flipped
// together, and new connections reach the guest at new_ip (NAT) and
// new_ip6 (NAT66).
func TestDualStackMigration(t *testing.T) {
	m := spec(t)
	m.Network.OldIP6, m.Network.NewIP6, m.Network.Gateway6 = lab.OldIP6, lab.NewIP6, lab.GatewayA6
	m.DNS.Name = lab.Svc6Name
	l, vm, p := setupSpec(t, lab.VMConfig{}, m)
	ctx := context.Background()
	dial := l.Dialer(lab.Client)
	var conns []*echoConn
	for _, target := range []struct {
		name string
		addr netip.Addr
	}{{"v4", vm.IP}, {"v6", lab.OldIP6}} {
		c, err := dial(ctx, "tcp", netip.AddrPortFrom(target.addr, 7).String())
		if err != nil {
			t.Fatalf("%s: dial %s: %v", target.name, target.addr, err)
		}
		defer c.Close()
		conns = append(conns, &echoConn{name: target.name, c: c})
	}
	ectx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, e := range conns {
		wg.Add(1)
		go func() { defer wg.Done(); e.run(ectx) }()
	}
	time.Sleep(time.Second)
	before := make([]int, len(conns))
	for i, e := range conns {
		before[i], _ = e.result()
	}

	rep, err := migrator.Run(ctx, p)
	if err != nil {
		stop()
		wg.Wait()
		t.Fatalf("migrate: %v", err)
	}
	t.Logf("total %s, pause %s, redirected %v", rep.Total.Round(time.Millisecond), rep.Pause, rep.Redirected)
	// Both connections still echo after the move: through host A and
	// the tunnel (they were made to the old addresses).
	time.Sleep(3 * time.Second)
	mid := make([]int, len(conns))
	for i, e := range conns {
		mid[i], _ = e.result()
	}
	time.Sleep(3 * time.Second)
	stop()
	wg.Wait()
	for i, e := range conns {
		n, err := e.result()
		t.Logf("%s connection: %d lines echoed (%d before the move, %d at 3 s after)", e.name, n, before[i], mid[i])
		if err != nil {
			t.Errorf("%s connection broke: %v", e.name, err)
		}
		if n <= mid[i] || mid[i] <= before[i] {
			t.Errorf("%s connection stopped echoing: %d lines before the move, %d 3 s after it, %d at the end", e.name, before[i], mid[i], n)
		}
	}
	c, _ := p.Source.RedirectState(ctx, migrator.RedirectQuery{OldIP: p.OldIP})
	t.Logf("host A's redirect counters (both families): %v", c.Counters)

	// svc6 holds both new addresses.
	for _, q := range []struct {
		t    uint16
		want netip.Addr
	}{{dns.TypeA, lab.NewIP}, {dns.TypeAAAA, lab.NewIP6}} {
		r, err := l.QueryDNS(lab.Client, lab.Svc6Name, q.t)
		if err != nil || len(r.Answer) != 1 {
			t.Fatalf("%s %s: %v %v", lab.Svc6Name, dns.TypeToString[q.t], r, err)
		}
		var got netip.Addr
		switch rr := r.Answer[0].(type) {
		case *dns.A:
			got, _ = netip.AddrFromSlice(rr.A.To4())
		case *dns.AAAA:
			got, _ = netip.AddrFromSlice(rr.AAAA)
		}
		if got != q.want {
			t.Errorf("%s %s = %s, want %s", lab.Svc6Name, dns.TypeToString[q.t], got, q.want)
		}
	}
	// New connections to both new addresses are answered by the guest.
	for _, a := range []netip.Addr{lab.NewIP, lab.NewIP6} {
		c, err := dial(ctx, "tcp", netip.AddrPortFrom(a, 7).String())
		if err != nil {
			t.Fatalf("dial %s: %v", a, err)
		}
		msg := []byte("hello at the new address\n")
		c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, len(msg))
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("%s: %v", a, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Errorf("echo at %s: %q, %v", a, buf, err)
		}
		c.Close()
	}
}
