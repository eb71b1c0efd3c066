package migrator

import "testing"

func TestMemoryShare(t *testing.T) {
	const total = 12_500_000 // 100 Mbit/s
	for _, c := range []struct {
		disk float64
		want uint64
	}{
		{0, total},
		{2_500_000, 10_000_000},
		{12_500_000, total / 4},
		{50_000_000, total / 4},
		{-1, total},
	} {
		if got := MemoryShare(total, c.disk); got != c.want {
			t.Errorf("MemoryShare(%d, %.0f) = %d, want %d", total, c.disk, got, c.want)
		}
	}
}
