package daemon

import (
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/storage"
)

// SpecPlan is the part of a migrator.Plan a migration spec alone decides:
// the limits, the VM's addresses (both families), the DNS name, the
// drain, the health check and whether to redirect. The caller adds the
// hosts, the driver, the disk strategy, the DNS client and the log (a
// vmhopd job, its recovery, or the lab's in-process plan): one mapping,
// so a recovery plans the same addresses the migration moved.
func SpecPlan(spec *config.Migration) migrator.Plan {
	return migrator.Plan{
		Limits: hypervisor.Options{
			Bandwidth: spec.Limits.Bandwidth, Downtime: spec.Limits.Downtime, AutoConverge: spec.Limits.AutoConverge,
			MaxIterations: spec.Limits.MaxIterations, Deadline: spec.Limits.Deadline,
		},
		OldIP: spec.Network.OldIP, NewIP: spec.Network.NewIP, Gateway: spec.Network.Gateway,
		OldIP6: spec.Network.OldIP6, NewIP6: spec.Network.NewIP6, Gateway6: spec.Network.Gateway6,
		Zone: spec.DNS.Zone, DNSName: spec.DNS.Name, TTL: spec.DNS.TTL,
		DrainIdle: spec.Network.DrainIdle, DrainTimeout: spec.Network.DrainTimeout,
		Health: &migrator.HealthCheck{Target: spec.Network.NewIP, TCPPort: spec.Health.TCPPort,
			HTTPPath: spec.Health.HTTPPath, HTTPPort: spec.Health.HTTPPort, Deadline: spec.Health.Deadline},
		NoRedirect: !spec.Network.Redirect,
	}
}

// SpecTuning is how the spec's migration streams yield to the VM's
// traffic (limits.pacing, limits.congestion).
func SpecTuning(spec *config.Migration) storage.WANTuning {
	return storage.WANTuning{Pacing: spec.Limits.Pacing, Congestion: spec.Limits.Congestion}
}
