package wanem

import (
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

func TestShaperDelayAndRate(t *testing.T) {
	s := newShaper(Profile{Delay: 20 * time.Millisecond, Rate: 100 * units.Mbit})
	t0 := time.Unix(1000, 0)
	// 1250 bytes at 100 Mbit/s take 100 µs on the wire.
	due, v := s.admit(t0, 1250)
	if v != sent || due.Sub(t0) != 20*time.Millisecond+100*time.Microsecond {
		t.Fatalf("first frame: due %v verdict %d", due.Sub(t0), v)
	}
	// A second frame offered at the same instant waits for the first.
	due, _ = s.admit(t0, 1250)
	if due.Sub(t0) != 20*time.Millisecond+200*time.Microsecond {
		t.Fatalf("second frame: due %v", due.Sub(t0))
	}
	// After the wire went idle, no queueing delay remains.
	t1 := t0.Add(time.Second)
	due, _ = s.admit(t1, 125)
	if due.Sub(t1) != 20*time.Millisecond+10*time.Microsecond {
		t.Fatalf("idle frame: due %v", due.Sub(t1))
	}
}

func TestShaperTailDrop(t *testing.T) {
	// 10 kB queue at 1 Mbit/s: 80 ms of backlog at most.
	s := newShaper(Profile{Rate: units.Mbit, Queue: 10000})
	t0 := time.Unix(0, 0)
	n, drops := 0, 0
	for range 20 {
		if _, v := s.admit(t0, 1000); v == sent {
			n++
		} else if v == queueFull {
			drops++
		}
	}
	// Frame k starts after k ms of backlog: 0..80 ms admitted (9 or 10 frames... plus the one on the wire).
	if n < 9 || n > 11 || drops != 20-n {
		t.Fatalf("sent %d dropped %d", n, drops)
	}
}

func TestShaperLoss(t *testing.T) {
	s := newShaper(Profile{Loss: 0.25})
	seq := []float64{0.1, 0.5, 0.24, 0.9}
	i := 0
	s.rnd = func() float64 { i++; return seq[i-1] }
	var got []int
	for range seq {
		_, v := s.admit(time.Unix(0, 0), 100)
		got = append(got, v)
	}
	want := []int{lost, sent, lost, sent}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("verdicts %v, want %v", got, want)
		}
	}
}

func TestDefaultQueueIs50ms(t *testing.T) {
	p := Profile{Rate: 100 * units.Mbit}
	if got := p.queueLimit(); got != 50*time.Millisecond {
		t.Fatalf("queue limit %v", got)
	}
}
