package labrun

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/lab/labtest"
)

func TestMain(m *testing.M) {
	lab.RunChild()
	os.Exit(m.Run())
}

// TestCheckGuestFindsInjectedLoss: the whole chain that judges a migration
// (the guest's RAM verifier, its status page, CheckGuest) fails when a
// memory update is lost: one is made on purpose in a real guest.
func TestCheckGuestFindsInjectedLoss(t *testing.T) {
	l := labtest.New(t, lab.Config{})
	ctx := context.Background()
	vm, err := l.StartVM(ctx, lab.VMConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitGuest(ctx, vm.IP, 90*time.Second); err != nil {
		t.Fatal(err)
	}
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		t.Fatal(err)
	}
	if g := CheckGuest(ctx, l, vm.IP, before); !g.OK() || g.MemCycles < 2 {
		t.Fatalf("clean guest judged wrong: %+v", g)
	}
	resp, err := l.HTTPClient(lab.Client).Post("http://"+vm.IP.String()+"/memcheck/inject?page=4000", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("inject: %s", resp.Status)
	}
	g := CheckGuest(ctx, l, vm.IP, before)
	t.Logf("after the injected loss: %+v", g)
	if g.OK() || g.MemLost != 1 || !strings.Contains(g.Problem, "1 lost") || !strings.Contains(g.Problem, "Page:4000") {
		t.Fatalf("injected loss not reported: %+v", g)
	}
}
