package qemu

import (
	"strings"
	"testing"
)

func TestTCGDirtySyncRisk(t *testing.T) {
	for _, c := range []struct {
		major, minor int
		kvm          bool
		ram          uint64
		risk         bool
	}{
		{7, 2, false, 128 << 20, true},
		{7, 2, false, 128<<20 + 8<<10, false}, // the lab's size: slow path
		{7, 2, true, 128 << 20, false},        // KVM keeps its own dirty log
		{9, 0, false, 128 << 20, false},       // fixed upstream
		{8, 2, false, 4 << 30, true},
	} {
		w := TCGDirtySyncRisk(c.major, c.minor, c.kvm, c.ram)
		if (w != "") != c.risk {
			t.Errorf("QEMU %d.%d kvm=%v ram=%d: %q, want risk %v", c.major, c.minor, c.kvm, c.ram, w, c.risk)
		}
		if w != "" && !strings.Contains(w, "03bfc2188f") {
			t.Errorf("warning does not name the upstream fix: %q", w)
		}
	}
}
