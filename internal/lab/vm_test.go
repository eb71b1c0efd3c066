package lab

import "testing"

func TestMemmb(t *testing.T) {
	if got := memmb(0); got != "" {
		t.Errorf("memmb(0) = %q, want the default (nothing)", got)
	}
	if got := memmb(16); got != " vmhop.memmb=16" {
		t.Errorf("memmb(16) = %q", got)
	}
}
