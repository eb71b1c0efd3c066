package metrics

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// The datapath's counters as series. The BPF program counts per old
// address and per CPU (proxy/datapath: enum counter in bpf/consts.h);
// a scrape sums them over both, so a series is the whole host's. An
// address's counters are removed with its VM entry, so these counters
// can go down: Prometheus' rate() treats that as a counter reset.
var (
	redirectPackets = prometheus.NewDesc(prometheus.BuildFQName(Namespace, "redirect", "packets_total"),
		"Packets the eBPF datapath handled, by direction: encap (tunnelled to the peer), decap (from a peer), "+
			"delivered (to the VM's tap), dnat, snat, tunnel_back (from the VM back through the tunnel).",
		[]string{"direction"}, nil)
	redirectBytes = prometheus.NewDesc(prometheus.BuildFQName(Namespace, "redirect", "bytes_total"),
		"Bytes the eBPF datapath encapsulated or decapsulated, by direction.", []string{"direction"}, nil)
	redirectDrops = prometheus.NewDesc(prometheus.BuildFQName(Namespace, "redirect", "drops_total"),
		"Packets the eBPF datapath dropped, by reason: no_route, unknown_vm, error (a BPF helper failed), "+
			"too_big (no ICMP could be sent), tuple_clash (no free client port at the NAT), "+
			"spoofed (tunnel packets from a peer's address without the migration's token).", []string{"reason"}, nil)
	redirectEvents = prometheus.NewDesc(prometheus.BuildFQName(Namespace, "redirect", "events_total"),
		"Other datapath actions, by event: arp_replies (for the VM's old gateway), icmp_too_big "+
			"(fragmentation needed sent), mss_clamped (SYNs whose MSS was lowered for the tunnel), "+
			"nat_port_translated (a new client flow given another port so no two flows share a guest 4-tuple), "+
			"fragmented (packets without DF too big for the tunnel, sent as two inner fragments).",
		[]string{"event"}, nil)
	redirectReadFailed = prometheus.NewDesc(prometheus.BuildFQName(Namespace, "redirect", "read_failed"),
		"1 if reading the datapath's BPF counters failed on this scrape (the redirect series are then missing or partial).",
		nil, nil)
)

// series maps one datapath counter name (proxy/datapath.CounterNames) to
// its series and label value; ok is false for a name it does not know.
func series(name string) (d *prometheus.Desc, label string, ok bool) {
	switch {
	case strings.HasPrefix(name, "drop_"):
		return redirectDrops, strings.TrimPrefix(name, "drop_"), true
	case strings.HasSuffix(name, "_packets"):
		return redirectPackets, strings.TrimSuffix(name, "_packets"), true
	case strings.HasSuffix(name, "_bytes"):
		return redirectBytes, strings.TrimSuffix(name, "_bytes"), true
	case name == "arp_replies" || name == "icmp_too_big" || name == "mss_clamped" ||
		name == "nat_port_translated" || name == "fragmented":
		return redirectEvents, name, true
	}
	return nil, "", false
}

// redirectCollector reads the datapath's counters at each scrape.
type redirectCollector struct{ m *Metrics }

func (c redirectCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{redirectPackets, redirectBytes, redirectDrops, redirectEvents, redirectReadFailed} {
		ch <- d
	}
}

func (c redirectCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	read := c.m.counters
	c.m.mu.Unlock()
	if read == nil {
		return
	}
	counters, err := read()
	failed := 0.0
	if err != nil {
		failed = 1
	}
	ch <- prometheus.MustNewConstMetric(redirectReadFailed, prometheus.GaugeValue, failed)
	for name, v := range counters {
		if d, label, ok := series(name); ok {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), label)
		}
	}
}
