package guest

import (
	"slices"
	"testing"
)

func TestMemCheckClean(t *testing.T) {
	m, err := NewMemCheck(make([]byte, 64*PageSize), 4)
	if err != nil {
		t.Fatal(err)
	}
	for range 100 {
		m.Step(3, 16)
	}
	s := m.Stats()
	if s.Lost != 0 || s.Corrupt != 0 || len(s.First) != 0 {
		t.Fatalf("clean run reported losses: %+v", s)
	}
	if s.Cycles != 25 || s.Checks != 100*4+1600 || s.Writes != 64+100*(4+3) {
		t.Fatalf("stats = %+v, want 25 cycles, 2000 checks, %d writes", s, 64+100*7)
	}
}

// A lost update, made on purpose: a page is put back to an older copy of
// itself, as a destination that missed a dirty page resumes with it.
func TestMemCheckFindsLostUpdate(t *testing.T) {
	for _, tc := range []struct {
		name string
		page int
	}{{"hot page", 1}, {"cold page", 40}} {
		t.Run(tc.name, func(t *testing.T) {
			mem := make([]byte, 64*PageSize)
			m, err := NewMemCheck(mem, 4)
			if err != nil {
				t.Fatal(err)
			}
			m.Step(64, 0) // every cold page rewritten once
			old := slices.Clone(mem[tc.page*PageSize : (tc.page+1)*PageSize])
			m.Step(64, 0) // ... and again: the page moves on
			copy(mem[tc.page*PageSize:], old)
			m.Step(0, 64)
			s := m.Stats()
			if s.Lost != 1 || s.Corrupt != 0 || len(s.First) != 1 {
				t.Fatalf("stats = %+v, want one lost page", s)
			}
			l := s.First[0]
			if l.Page != tc.page || l.Kind != "stale" || l.Got >= l.Want {
				t.Fatalf("loss = %+v, want page %d stale", l, tc.page)
			}
			// The page was rewritten: the next pass is clean.
			m.Step(0, 64)
			if s := m.Stats(); s.Lost != 1 {
				t.Fatalf("loss counted again: %+v", s)
			}
		})
	}
}

func TestMemCheckFindsCorruptAndFuture(t *testing.T) {
	mem := make([]byte, 8*PageSize)
	m, err := NewMemCheck(mem, 0)
	if err != nil {
		t.Fatal(err)
	}
	mem[3*PageSize+PageSize-1] ^= 0x80 // tail word of page 3
	m.want[5]--                        // the record of page 5 went back: the page is "from the future"
	m.Step(0, 8)
	s := m.Stats()
	if s.Corrupt != 1 || s.Lost != 1 {
		t.Fatalf("stats = %+v, want 1 corrupt and 1 lost", s)
	}
	if s.First[0].Page != 3 || s.First[0].Kind != "corrupt" || s.First[1].Page != 5 || s.First[1].Kind != "future" {
		t.Fatalf("losses = %+v", s.First)
	}
}

func TestMemCheckRefusesBadSizes(t *testing.T) {
	if _, err := NewMemCheck(make([]byte, PageSize+1), 0); err == nil {
		t.Error("partial page accepted")
	}
	if _, err := NewMemCheck(make([]byte, 2*PageSize), 3); err == nil {
		t.Error("hot set larger than working set accepted")
	}
}
