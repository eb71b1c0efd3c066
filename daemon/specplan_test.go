package daemon

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/vmhop/vmhop/internal/config"
)

// TestSpecPlanMapsEverySpecField: the one spec-to-plan mapping (a job's,
// its recovery's, the lab's) carries a dual-stack VM's IPv6 side, the
// redirect switch, the limits, the DNS name, the drain and the health
// check; a recovery built on it (which once left out IPv6 and the
// redirect switch) undoes or finishes the same addresses.
func TestSpecPlanMapsEverySpecField(t *testing.T) {
	spec := strings.NewReplacer(
		"# old_ip6: 'fd00:1::10'", "old_ip6: 'fd00:1::10'",
		"# new_ip6: 'fd00:2::10'", "new_ip6: 'fd00:2::10'",
		"# gateway6: 'fe80::1'", "gateway6: 'fe80::1'",
		"redirect: true", "redirect: false",
	).Replace(string(readSpec(t)))
	f, err := config.Parse([]byte(spec))
	if err != nil {
		t.Fatal(err)
	}
	m := f.Migration
	if m == nil || !m.Network.OldIP6.IsValid() {
		t.Fatalf("the dual-stack spec did not parse as one: %+v", m)
	}
	p := SpecPlan(m)
	want := map[string][2]any{
		"old_ip6":       {p.OldIP6, netip.MustParseAddr("fd00:1::10")},
		"new_ip6":       {p.NewIP6, netip.MustParseAddr("fd00:2::10")},
		"old_ip":        {p.OldIP, m.Network.OldIP},
		"new_ip":        {p.NewIP, m.Network.NewIP},
		"gateway":       {p.Gateway, m.Network.Gateway},
		"gateway6":      {p.Gateway6, netip.MustParseAddr("fe80::1")},
		"no redirect":   {p.NoRedirect, true},
		"bandwidth":     {p.Limits.Bandwidth, m.Limits.Bandwidth},
		"downtime":      {p.Limits.Downtime, m.Limits.Downtime},
		"zone":          {p.Zone, m.DNS.Zone},
		"name":          {p.DNSName, m.DNS.Name},
		"ttl":           {p.TTL, m.DNS.TTL},
		"drain_timeout": {p.DrainTimeout, m.Network.DrainTimeout},
		"health target": {p.Health.Target, m.Network.NewIP},
	}
	for k, v := range want {
		if v[0] != v[1] {
			t.Errorf("%s: plan has %v, spec %v", k, v[0], v[1])
		}
	}
	if tu := SpecTuning(m); tu.Pacing != m.Limits.Pacing || tu.Congestion != m.Limits.Congestion {
		t.Errorf("tuning %+v from limits %+v", tu, m.Limits)
	}
}
