package labrun

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func every(start time.Time, n int, step time.Duration) []time.Time {
	var ts []time.Time
	for i := range n {
		ts = append(ts, start.Add(time.Duration(i)*step))
	}
	return ts
}

// A guest that dies stops answering: the stretch from its last answer to
// the end of the load is an outage, counted like any other gap.
func TestGapsInCountsTrailingOutage(t *testing.T) {
	t0 := time.Unix(1000, 0)
	arrivals := every(t0, 100, 10*time.Millisecond) // answers for 1 s
	end := t0.Add(5 * time.Second)                  // the load ran 5 s
	d := GapsIn(arrivals, 10*time.Millisecond, t0, end)
	trailing := end.Sub(arrivals[99])
	if d.Gaps != 1 || d.Longest != trailing || d.Total != trailing-10*time.Millisecond {
		t.Fatalf("disruption = %+v, want one trailing gap of %s", d, trailing)
	}
	if d.Outages != 1 || d.Worst[0].Start != arrivals[99] {
		t.Fatalf("outage not counted from the last answer: %+v", d)
	}
	// Without the window, the same arrivals look clean: what the old
	// report did.
	if d := Gaps(arrivals, 10*time.Millisecond); d.Gaps != 0 {
		t.Fatalf("Gaps without window = %+v", d)
	}
	// Nothing answered at all: the whole window is one gap.
	if d := GapsIn(nil, 10*time.Millisecond, t0, end); d.Gaps != 1 || d.Longest != 5*time.Second {
		t.Fatalf("no arrivals: %+v", d)
	}
}

func TestViewCountsUnansweredAndFailures(t *testing.T) {
	t0 := time.Unix(2000, 0)
	old, nu := netip.MustParseAddr("10.1.0.10"), netip.MustParseAddr("10.2.0.10")
	p := &Probe{Interval: 10 * time.Millisecond, sent: 300, got: 100, replies: every(t0, 100, 10*time.Millisecond), ports: []uint16{40000}}
	ld := &Load{Addr: old, Echo: []*Probe{p}, PingEvery: 10 * time.Millisecond, start: t0, end: t0.Add(3 * time.Second),
		pingSent: map[uint16]time.Time{7: t0, 8: t0}, pingGot: every(t0, 5, 10*time.Millisecond)}
	ms := time.Millisecond
	ld.http = []HTTPAttempt{
		{At: t0, Addr: old, Took: 20 * ms},
		{At: t0.Add(50 * ms), Addr: old, Took: 3000 * ms, Err: "timeout"},
		{At: t0.Add(100 * ms), Addr: old, Took: 1000 * ms, Err: "connection reset"},
		{At: t0.Add(150 * ms), Err: "resolve: timeout", Took: 2000 * ms},
		{At: t0.Add(400 * ms), Addr: nu, Took: 30 * ms},
		{At: t0.Add(450 * ms), Addr: nu, Took: 30 * ms},
	}
	v := ld.View(nil)
	e := v.Echo[0]
	if e.Sent != 300 || e.Got != 100 || e.Unanswered != 200 {
		t.Fatalf("echo = %+v, want 200 unanswered", e)
	}
	if e.Disruption.Gaps != 1 || e.Disruption.Longest != 3*time.Second-990*ms {
		t.Fatalf("echo disruption = %+v, want the trailing gap", e.Disruption)
	}
	// Captured arrivals, when given, replace the socket's.
	v2 := ld.View(map[uint16][]time.Time{40000: every(t0, 300, 10*time.Millisecond)})
	if g := v2.Echo[0].Disruption.Gaps; g != 0 {
		t.Fatalf("captured arrivals ignored: %d gaps", g)
	}
	h := v.HTTP
	if h.Attempts != 6 || h.OK != 3 || h.Failed != 3 {
		t.Fatalf("http = %+v", h)
	}
	if h.Longest != 350*ms || h.FailWindow != 3050*ms-50*ms {
		t.Fatalf("http longest %s, window %s", h.Longest, h.FailWindow)
	}
	if h.NewAddrAt != 400*ms || h.ByAddr["10.2.0.10"] != 2 || h.ByAddr["10.1.0.10"] != 3 {
		t.Fatalf("http addresses = %+v", h)
	}
	if v.Ping.Sent != 7 || v.Ping.Answered != 5 || v.Ping.Lost != 2 {
		t.Fatalf("ping = %+v", v.Ping)
	}
}

// Echo connections open spread over one interval, or at EchoOpenRate
// if that takes longer: 1000 at 1 Hz open 10 ms apart over 10 s, and
// their sends fall in 100 slots of the second, 10 in each.
func TestEchoPhaseSpreads(t *testing.T) {
	s := time.Second
	if got := echoRamp(1000, s); got != 10*time.Second {
		t.Errorf("ramp of 1000 at 1 Hz: %s, want 10s", got)
	}
	if got := echoRamp(10, 10*time.Millisecond); got != 100*time.Millisecond {
		t.Errorf("ramp of 10 at 100 Hz: %s, want 100ms", got)
	}
	if got := echoRamp(4, time.Second); got != time.Second {
		t.Errorf("ramp of 4 at 1 Hz: %s, want one interval", got)
	}
	slots := map[time.Duration]int{}
	for i := range 1000 {
		ph := echoPhase(i, 1000, s)
		if ph != time.Duration(i)*10*time.Millisecond {
			t.Fatalf("connection %d at %s, want %s", i, ph, time.Duration(i)*10*time.Millisecond)
		}
		slots[ph%s]++
	}
	if len(slots) != 100 || slots[0] != 10 || slots[990*time.Millisecond] != 10 {
		t.Errorf("sends fall in %d slots of the second (first %d, last %d), want 100 of 10", len(slots), slots[0], slots[990*time.Millisecond])
	}
	if got := echoPhase(3, 4, 10*time.Millisecond); got != 30*time.Millisecond {
		t.Errorf("4 at 100 Hz, the fourth: %s", got)
	}
	if got := echoPhase(0, 1, s); got != 0 {
		t.Errorf("one connection: %s", got)
	}
}

// WaitEcho counts the connections that have had an answer, and returns
// at once when every one has.
func TestWaitEcho(t *testing.T) {
	t0 := time.Now()
	ld := &Load{Conns: 3, EchoEvery: time.Second}
	ld.Echo = []*Probe{{replies: []time.Time{t0}}, {replies: []time.Time{t0}}, {replies: []time.Time{t0}}}
	if up, of := ld.WaitEcho(context.Background(), time.Minute); up != 3 || of != 3 || time.Since(t0) > time.Second {
		t.Fatalf("all up: %d of %d after %s", up, of, time.Since(t0))
	}
	ld.Echo[1].replies = nil
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if up, of := ld.WaitEcho(ctx, time.Minute); up != 2 || of != 3 {
		t.Fatalf("one down: %d of %d", up, of)
	}
}

// A client waits at least 3 of its intervals (where the disruption
// count starts) before it gives up; faster ones keep the load's 2 s.
func TestPatience(t *testing.T) {
	for _, c := range []struct{ giveUp, every, want time.Duration }{
		{2 * time.Second, 10 * time.Millisecond, 2 * time.Second},
		{2 * time.Second, 100 * time.Millisecond, 2 * time.Second},
		{2 * time.Second, time.Second, 3 * time.Second},
		{5 * time.Second, time.Second, 5 * time.Second},
	} {
		if got := patience(c.giveUp, c.every); got != c.want {
			t.Errorf("patience(%s, %s) = %s, want %s", c.giveUp, c.every, got, c.want)
		}
	}
}

// A failure after the switch is no source left unsafe: the summary says
// the VM moved.
func TestSourceStateSummary(t *testing.T) {
	safe := SourceState{QEMU: "running", QMPStatus: "running", Answers: true, SameBoot: true, DNS: "10.1.0.10", DNSUnchanged: true, Safe: true}
	if got := safe.Summary(); got != "safe: QEMU running, QMP status running, the guest answers (same boot), DNS 10.1.0.10 (unchanged)" {
		t.Errorf("safe: %s", got)
	}
	moved := SourceState{Moved: true, QEMU: "running", QMPStatus: "postmigrate", Answers: true, SameBoot: true, DNS: "10.1.0.10", DNSUnchanged: true}
	if got := moved.Summary(); !strings.HasPrefix(got, "moved, not at the source: the VM moved (the failure came after the switch") {
		t.Errorf("moved: %s", got)
	}
	if got := lastPanic("x\n[   79.121046] Kernel panic - not syncing: System is deadlocked on memory\n[ 79.12]  panic+0x118\n"); got != "Kernel panic - not syncing: System is deadlocked on memory" {
		t.Errorf("lastPanic: %q", got)
	}
}
