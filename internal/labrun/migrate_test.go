package labrun

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator"
)

// TestPhaseAt: gaps are named by the phase running then; dns-prepare runs
// beside the disk phases and memory waits for it.
func TestPhaseAt(t *testing.T) {
	s := time.Unix(1000, 0)
	o := Outcome{Start: s, Report: migrator.Report{Phases: []migrator.Phase{
		{Name: "datapath", Duration: 100 * time.Millisecond},
		{Name: "destination", Duration: 400 * time.Millisecond},
		{Name: "disk-bulk", Duration: time.Second},
		{Name: "disk-prehash", Duration: 100 * time.Millisecond},
		{Name: "dns-prepare", Duration: 10 * time.Second},
		{Name: "memory", Duration: 9 * time.Second},
		{Name: "dns-flip", Duration: 200 * time.Millisecond},
	}}}
	for _, c := range []struct {
		at   time.Duration
		want string
	}{
		{50 * time.Millisecond, "datapath"},
		{300 * time.Millisecond, "destination"},
		{time.Second, "disk-bulk"},
		{1550 * time.Millisecond, "disk-prehash"},
		{5 * time.Second, "dns-prepare"},
		{10200 * time.Millisecond, "memory"},
		{19200 * time.Millisecond, "dns-flip"},
		{25 * time.Second, "after the migration"},
	} {
		if got := o.phaseAt(s.Add(c.at)); got != c.want {
			t.Errorf("at %s: %s, want %s", c.at, got, c.want)
		}
	}
}

// TestSwitchGap: the switch gap is the longest echo gap that covers the
// pause (the end of the memory phase); other gaps do not count.
func TestSwitchGap(t *testing.T) {
	s := time.Unix(1000, 0)
	ms := time.Millisecond
	o := Outcome{Start: s, Report: migrator.Report{Pause: 150 * ms, Phases: []migrator.Phase{
		{Name: "datapath", Duration: time.Second},
		{Name: "memory", Duration: 9 * time.Second}, // the VM resumes at 10 s
		{Name: "dns-flip", Duration: time.Second},
	}}}
	o.Client.Echo = []EchoView{
		{Disruption: Disruption{Worst: []Gap{{Start: s.Add(3 * time.Second), Length: 900 * ms}, {Start: s.Add(9900 * ms), Length: 400 * ms}}}},
		{Disruption: Disruption{Worst: []Gap{{Start: s.Add(9850 * ms), Length: 500 * ms}}}},
		{Disruption: Disruption{Worst: []Gap{{Start: s.Add(10100 * ms), Length: 2 * time.Second}}}}, // after the resume
	}
	if got := o.SwitchGap(); got != 500*ms {
		t.Fatalf("SwitchGap = %s, want 500ms", got)
	}
}

// TestMigrateWithUnknownRedirect: an unknown redirect is refused as a
// bad option before the lab is touched (a nil lab would panic).
func TestMigrateWithUnknownRedirect(t *testing.T) {
	_, err := MigrateWith(context.Background(), nil, nil, nil, &Load{}, Options{Redirect: "tc"})
	if err == nil || !strings.Contains(err.Error(), `redirect "tc"`) {
		t.Fatalf("unknown redirect: %v, want a refusal naming it", err)
	}
}
