package migrator

import (
	"context"
	"testing"
)

// livenessDriver is the fake driver as a hypervisor.Recoverable and
// hypervisor.Liveness whose source VM is gone or not.
type livenessDriver struct {
	*fakeDriver
	gone bool
}

func (d livenessDriver) ConnectSource(context.Context) error {
	d.ev.add("driver: connect source")
	return nil
}
func (d livenessDriver) SourceMigrated(context.Context) (bool, error) { return false, nil }
func (d livenessDriver) CancelMigration(context.Context) error        { return nil }
func (d livenessDriver) SourceGone(context.Context) (bool, string)    { return d.gone, "test" }
func (d livenessDriver) DestinationStatus(context.Context) (string, error) {
	return "inmigrate", nil
}

// TestRecoverSourceGone: with the source VM gone (hypervisor.Liveness)
// recovery neither dials its hypervisor nor stops it (stop-source has
// nothing to do); with it there, it connects and stops it.
func TestRecoverSourceGone(t *testing.T) {
	for _, gone := range []bool{true, false} {
		w := newWorld(t, "web1")
		w.plan.Driver = livenessDriver{fakeDriver: w.drv, gone: gone}
		if err := Recover(context.Background(), w.plan, RecoveryState{Token: 7}, []RecoveryAction{ActStopSource}, nil); err != nil {
			t.Fatal(err)
		}
		want := []string{"driver: connect source", "driver: connect source", "driver: stop source"}
		if gone {
			want = nil
		}
		sameEvents(t, w.ev.get(), want)
	}
}
