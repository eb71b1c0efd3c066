package migrator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

// phaseLog records OnPhase calls and the fakes' state at each.
type phaseLog struct {
	mu   sync.Mutex
	list []PhaseEvent
	w    *fakeWorld
	// at each call: the source redirect and driver states, to prove the
	// hook ran before (start) or after (end) the phase acted
	seen []string
}

func (l *phaseLog) hook(_ context.Context, ev PhaseEvent) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.list = append(l.list, ev)
	l.seen = append(l.seen, fmt.Sprintf("%s end=%v redirect=%q source=%q dest=%q", ev.Phase, ev.End, l.w.src.redirect, l.w.drv.source, l.w.drv.dest))
	return nil
}

// TestOnPhaseOrder: OnPhase sees each phase start before it acts and end
// after, in Run's order, with the token before the datapath phase, the
// TTL before dns-prepare once lowered, and Committed from the memory
// phase's end on.
func TestOnPhaseOrder(t *testing.T) {
	w := newWorld(t, "web1")
	l := &phaseLog{w: w}
	w.plan.OnPhase = l.hook
	if _, err := Run(context.Background(), w.plan); err != nil {
		t.Fatal(err)
	}
	w.plan.dnsCachedUntil = time.Time{} // the fake's records were never cached
	if _, err := Drain(context.Background(), w.plan); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ev := range l.list {
		if ev.Phase == "dns-prepare" {
			continue
		}
		names = append(names, fmt.Sprintf("%s/%v", ev.Phase, ev.End))
	}
	want := "datapath/false datapath/true destination/false destination/true disk-bulk/false disk-bulk/true " +
		"disk-prehash/false disk-prehash/true memory/false memory/true disk-release/false disk-release/true " +
		"dns-flip/false dns-flip/true dns-restore/false dns-restore/true source-cleanup/false source-cleanup/true drain/false drain/true"
	if got := strings.Join(names, " "); got != want {
		t.Fatalf("phases:\n  %s\nwant\n  %s", got, want)
	}
	first := l.list[0]
	if first.Phase != "datapath" || first.End || first.Token == 0 || first.Token != w.plan.Token {
		t.Errorf("first event %+v: want datapath's start with the plan's token %d", first, w.plan.Token)
	}
	// The hook runs before the phase acts: the redirect is not installed
	// at datapath's start, installed ("off") at its end.
	if !strings.Contains(l.seen[0], `redirect=""`) || !strings.Contains(l.seen[1], `redirect="off"`) {
		t.Errorf("datapath hook states: %q, %q", l.seen[0], l.seen[1])
	}
	for i, ev := range l.list {
		wantCommitted := slices.Index(names, "memory/true") >= 0 && (ev.Phase != "datapath" && ev.Phase != "dns-prepare" &&
			ev.Phase != "destination" && !strings.HasPrefix(ev.Phase, "disk-bulk") && ev.Phase != "disk-prehash" && ev.Phase != "memory")
		if ev.Phase == "memory" && ev.End {
			wantCommitted = false // set once memory ended: the next event carries it
		}
		if ev.Committed != wantCommitted {
			t.Errorf("event %d %s end=%v: committed %v", i, ev.Phase, ev.End, ev.Committed)
		}
		if ev.Phase == "dns-prepare" && ev.End && ev.DNSTTLBefore != 300 {
			t.Errorf("dns-prepare end: TTL before %d, want 300", ev.DNSTTLBefore)
		}
		if ev.Phase == "dns-flip" && ev.End && ev.DNSCachedUntil.IsZero() {
			t.Errorf("dns-flip end without DNSCachedUntil")
		}
	}
}

// TestOnPhaseErrorAbortsBeforeActing: a hook that fails before a phase
// keeps the phase from acting; Run undoes what earlier phases did.
func TestOnPhaseErrorAbortsBeforeActing(t *testing.T) {
	errJournal := errors.New("journal: disk full")
	for _, phase := range []string{"datapath", "destination", "memory"} {
		t.Run(phase, func(t *testing.T) {
			w := newWorld(t, "web1")
			w.plan.OnPhase = func(_ context.Context, ev PhaseEvent) error {
				if ev.Phase == phase && !ev.End {
					return errJournal
				}
				return nil
			}
			_, err := Run(context.Background(), w.plan)
			if !errors.Is(err, errJournal) || ExitCode(err) != ExitAborted {
				t.Fatalf("err = %v (exit %d), want the hook's error, exit %d", err, ExitCode(err), ExitAborted)
			}
			ev := w.ev.get()
			acted := map[string]string{"datapath": "source: prepare", "destination": "dest: create image", "memory": "driver: migrate"}[phase]
			if slices.ContainsFunc(ev, func(s string) bool { return strings.HasPrefix(s, acted) }) {
				t.Fatalf("phase %s acted (%q) despite its hook's error:\n  %s", phase, acted, strings.Join(ev, "\n  "))
			}
			if w.drv.source != "running" || w.src.redirect != "" || w.dst.vm || w.src.tunnels != 0 {
				t.Errorf("after: source %q, redirect %q, vm entry %v, tunnels %d", w.drv.source, w.src.redirect, w.dst.vm, w.src.tunnels)
			}
			if _, err := os.Stat(w.dstImg); !os.IsNotExist(err) {
				t.Errorf("destination image left: %v", err)
			}
		})
	}
}

// TestStallWatchdog: a memory stream whose bytes stop growing is aborted
// after StallTimeout; the source runs, everything is undone, and the error
// says stalled (exit: aborted).
func TestStallWatchdog(t *testing.T) {
	w := newWorld(t, "web1")
	w.drv.stall = true
	w.plan.StallTimeout = 150 * time.Millisecond
	w.plan.DNS = nil
	t0 := time.Now()
	_, err := Run(context.Background(), w.plan)
	took := time.Since(t0)
	if !errors.Is(err, ErrStalled) || !errors.Is(err, hypervisor.ErrCancelled) || ExitCode(err) != ExitAborted {
		t.Fatalf("err = %v, want ErrStalled wrapping the driver's cancel, exit %d", err, ExitAborted)
	}
	if took < 150*time.Millisecond || took > 5*time.Second {
		t.Errorf("aborted after %s, want just over the 150ms stall timeout", took)
	}
	if w.drv.source != "running" || w.src.redirect != "" || w.dst.vm || w.drv.dest != "" {
		t.Errorf("after: source %q, redirect %q, vm entry %v, destination %q", w.drv.source, w.src.redirect, w.dst.vm, w.drv.dest)
	}
	if !slices.Contains(w.ev.get(), "driver: cancelled, source running") {
		t.Errorf("driver not cancelled: %v", w.ev.get())
	}
}

// coarseDriver reports progress without bytes (as VirtualBox's percent
// steps): not a ByteReporter.
type coarseDriver struct{ hypervisor.Driver }

// TestStallWatchdogOnlyWatchesByteReporters: a driver whose progress
// does not carry bytes is not aborted however long it reports the same.
func TestStallWatchdogOnlyWatchesByteReporters(t *testing.T) {
	w := newWorld(t, "web1")
	w.drv.stall = true
	w.plan.StallTimeout = 50 * time.Millisecond
	w.plan.DNS = nil
	w.plan.Driver = coarseDriver{w.drv}
	ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
	defer cancel()
	_, err := Run(ctx, w.plan)
	if errors.Is(err, ErrStalled) || !errors.Is(err, hypervisor.ErrCancelled) {
		t.Fatalf("err = %v, want the caller's cancel, not a stall", err)
	}
}

// TestStallWatchdogSparesTheHook: a switchover hook longer than the
// stall timeout is not a stall (the driver reports nothing meanwhile).
func TestStallWatchdogSparesTheHook(t *testing.T) {
	w := newWorld(t, "web1")
	w.plan.StallTimeout = 50 * time.Millisecond
	w.plan.DNS = nil
	progress := make(chan hypervisor.Progress, 100)
	w.plan.Progress = progress
	w.plan.OnSwitch = func(ctx context.Context) error {
		select {
		case <-time.After(300 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	w.drv.memory = 0
	// One report arms the watchdog before the hook.
	drv := &reportingDriver{fakeDriver: w.drv}
	w.plan.Driver = drv
	if _, err := Run(context.Background(), w.plan); err != nil {
		t.Fatalf("a long hook was taken for a stall: %v", err)
	}
	if len(progress) != 1 {
		t.Errorf("%d progress reports forwarded to Plan.Progress, want 1", len(progress))
	}
}

// reportingDriver sends one progress report before migrating.
type reportingDriver struct{ *fakeDriver }

func (d *reportingDriver) Migrate(ctx context.Context, o hypervisor.Options, progress chan<- hypervisor.Progress, hook hypervisor.Switchover) (hypervisor.Result, error) {
	progress <- hypervisor.Progress{Status: "active", Transferred: 1}
	return d.fakeDriver.Migrate(ctx, o, progress, hook)
}

var snakeWithUnits = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)

// TestReportJSON: the report, its phases, the runtime result and progress
// encode with snake_case names; durations end in _ms, and decode back.
func TestReportJSON(t *testing.T) {
	w := newWorld(t, "web1")
	rep, err := Run(context.Background(), w.plan)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	var check func(prefix string, v any)
	check = func(prefix string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if prefix == "redirected." {
					continue // datapath counter names
				}
				if !snakeWithUnits.MatchString(k) {
					t.Errorf("field %s%s is not snake_case", prefix, k)
				}
				check(prefix+k+".", x)
			}
		case []any:
			for _, x := range v {
				check(prefix, x)
			}
		}
	}
	check("", m)
	for _, k := range []string{"pause_ms", "total_ms", "disk_wire_bytes", "dns_wait_ms", "digest_read_bytes"} {
		if _, ok := m[k]; !ok {
			t.Errorf("no %s in %s", k, b)
		}
	}
	rt := m["runtime"].(map[string]any)
	if rt["downtime_ms"] != 5.0 {
		t.Errorf("runtime.downtime_ms = %v, want 5", rt["downtime_ms"])
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Runtime.Downtime != 5*time.Millisecond || back.DiskWire != rep.DiskWire || len(back.Phases) != len(rep.Phases) ||
		back.Phases[0].Name != "datapath" || back.DNSBefore[0] != rep.DNSBefore[0] {
		t.Errorf("decoded %+v, want %+v", back, rep)
	}
	if b, _ := json.Marshal(Preflight{DNSWait: 300 * time.Second, DNSCachedFor: 5 * time.Second}); string(b) != `{"dns_wait_ms":300000,"dns_cached_for_ms":5000}` {
		t.Errorf("preflight JSON %s", b)
	}
	pb, _ := json.Marshal(hypervisor.Progress{Status: "active", Elapsed: 1500 * time.Millisecond, Transferred: 7, Throughput: 8e6})
	if want := `{"status":"active","elapsed_ms":1500,"transferred_bytes":7,"remaining_bytes":0,"total_bytes":0,"dirty_bytes_per_s":0,"iteration":0,"throughput_bits_per_s":8000000,"expected_downtime_ms":0,"throttle_percent":0}`; string(pb) != want {
		t.Errorf("progress JSON\n  %s\nwant\n  %s", pb, want)
	}
}
