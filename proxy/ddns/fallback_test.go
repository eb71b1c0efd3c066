package ddns

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// truncatingServer answers every UDP query with TC=1 and no records, and TCP
// queries with the real answer: a client that returns anything right must
// have retried over TCP.
func truncatingServer(t *testing.T, host string) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("no %s on this machine: %v", host, err)
	}
	port := pc.LocalAddr().(*net.UDPAddr).Port
	ln, err := net.Listen("tcp", net.JoinHostPort(host, itoa(port)))
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		r := new(dns.Msg)
		r.SetReply(q)
		r.Authoritative = true
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			r.Truncated = true
		} else {
			switch q.Question[0].Qtype {
			case dns.TypeA:
				rr, _ := dns.NewRR("svc.example. 60 IN A 10.2.0.10")
				r.Answer = append(r.Answer, rr)
			case dns.TypeSOA:
				rr, _ := dns.NewRR("example. 60 IN SOA ns.example. h.example. 7 1 1 1 1")
				r.Answer = append(r.Answer, rr)
			}
		}
		w.WriteMsg(r)
	})
	udp := &dns.Server{PacketConn: pc, Handler: handler}
	tcp := &dns.Server{Listener: ln, Handler: handler}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	t.Cleanup(func() { udp.Shutdown(); tcp.Shutdown() })
	return net.JoinHostPort(host, itoa(port))
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestTCPFallbackOnTruncation(t *testing.T) {
	for _, host := range []string{"127.0.0.1", "::1"} {
		t.Run(host, func(t *testing.T) {
			srv := truncatingServer(t, host)
			c := &Client{Server: srv, Timeout: time.Second}
			s, err := c.Show(context.Background(), "example.", "svc.example.")
			if err != nil {
				t.Fatal(err)
			}
			if s.Serial != 7 || !sameRecords(s.Records, []Record{{netip.MustParseAddr("10.2.0.10"), 60}}) {
				t.Fatalf("state = %+v", s)
			}
		})
	}
}
