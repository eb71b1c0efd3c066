package migrator

import (
	"errors"
	"fmt"
	"testing"
)

func TestExitCode(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{nil, ExitMoved},
		{errors.New("destination: qemu exited"), ExitAborted},
		{fmt.Errorf("health: %w: tcp 10.2.0.10:7: refused for 30s", ErrUnhealthy), ExitUnhealthy},
		{fmt.Errorf("%w: dns-flip: REFUSED", ErrFollowUp), ExitFollowUp},
	} {
		if got := ExitCode(c.err); got != c.want {
			t.Errorf("ExitCode(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}
