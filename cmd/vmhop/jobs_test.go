package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
)

// daemonWith serves the local API with m as the Migrator on a fresh
// socket, its state in stateDir; it returns the socket.
func daemonWith(t *testing.T, stateDir string, m daemon.Migrator) string {
	t.Helper()
	cfg := config.DefaultDaemon()
	cfg.StateDir = stateDir
	cfg.Socket = filepath.Join(t.TempDir(), "vmhopd.sock")
	d, err := daemon.New(cfg, daemon.Options{Migrator: m, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return cfg.Socket
}

func exitCode(err error) int {
	var ee cli.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.Code
	}
	return 1
}

// holding journals two phases, then waits in disk-bulk until cancelled.
func holding(started chan<- string) daemon.MigratorFunc {
	return func(ctx context.Context, job *daemon.Job) (any, error) {
		for _, ph := range []string{"datapath", "disk-bulk"} {
			job.OnPhase(ctx, migrator.PhaseEvent{Phase: ph, Token: 1})
			if ph == "datapath" {
				job.OnPhase(ctx, migrator.PhaseEvent{Phase: ph, End: true, Token: 1})
			}
		}
		started <- job.ID
		<-ctx.Done()
		job.OnPhase(ctx, migrator.PhaseEvent{Phase: "disk-bulk", End: true, Err: "context canceled"})
		return nil, errors.New("disk-bulk: context canceled")
	}
}

// TestStatusAbortHistory: status ID shows a running migration's phase
// and journal state; abort --wait undoes it and exits 1 (aborted); abort
// again is refused (exit 1); history lists it, rolled back, exit 1.
func TestStatusAbortHistory(t *testing.T) {
	started := make(chan string, 1)
	sock := daemonWith(t, t.TempDir(), holding(started))
	go execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--socket", sock)
	id := <-started
	out, _, err := execute(t, newStatusCmd(), id, "--socket", sock)
	if err != nil || !strings.Contains(out, "state    running") || !strings.Contains(out, "phase    disk-bulk") ||
		!strings.Contains(out, "journal  preparing") && !strings.Contains(out, "journal  copying") {
		t.Fatalf("status %s: %v\n%s", id, err, out)
	}
	out, _, err = execute(t, newAbortCmd(), id, "--wait", "--socket", sock)
	if exitCode(err) != migrator.ExitAborted || !strings.Contains(out, "aborted by vmhop abort") {
		t.Fatalf("abort --wait: exit %d (%v)\n%s", exitCode(err), err, out)
	}
	if _, _, err := execute(t, newAbortCmd(), id, "--socket", sock); exitCode(err) != 1 || !strings.Contains(err.Error(), "has ended") {
		t.Fatalf("second abort: %v", err)
	}
	if _, _, err := execute(t, newStatusCmd(), "nosuch-1", "--socket", sock); exitCode(err) != 1 || !strings.Contains(err.Error(), "no migration") {
		t.Fatalf("status of an unknown migration: %v", err)
	}
	out, _, err = execute(t, newHistoryCmd(), "--socket", sock)
	if err != nil || !regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(id)+` +qemu:/run/vmhop/web1.qmp +\S+ \S+ +\S+ +rolled-back +1 +aborted by vmhop abort`).MatchString(out) {
		t.Fatalf("history: %v\n%s", err, out)
	}
	out, _, _ = execute(t, newHistoryCmd(), "--socket", sock, "--json")
	var h []daemon.HistoryEntry
	if err := json.Unmarshal([]byte(out), &h); err != nil || len(h) != 1 || h[0].ExitCode != 1 || h[0].DurationMS <= 0 {
		t.Fatalf("history --json: %v %s", err, out)
	}
}

// TestRecoverCmd: with nothing left, recover says so and exits 0; with a
// record a killed vmhopd left, it shows the state and the actions and
// exits 1; --apply without a recovery-capable migrator says why.
func TestRecoverCmd(t *testing.T) {
	state := t.TempDir()
	sock := daemonWith(t, state, phases(nil))
	out, _, err := execute(t, newRecoverCmd(), "--socket", sock)
	if err != nil || !strings.Contains(out, "nothing to recover") {
		t.Fatalf("recover, nothing left: %v\n%s", err, out)
	}
	s := journal.NewStore(filepath.Join(state, "journal"))
	r := &journal.Record{ID: "web1-0badf00d", Name: "web1", VM: "qemu:/run/vmhop/web1.qmp", Started: time.Now().Add(-time.Minute)}
	for _, e := range []migrator.PhaseEvent{{Phase: "datapath", Token: 5}, {Phase: "datapath", End: true}, {Phase: "destination"}} {
		r.Apply(e, time.Now())
	}
	if err := s.Write(r); err != nil {
		t.Fatal(err)
	}
	out, _, err = execute(t, newRecoverCmd(), "--socket", sock)
	want := "journal: copying; done: datapath, destination\n  recovery will: roll-back: before the memory stream: the source VM never paused\n" +
		"    1. end-disk-stream\n    2. abort-destination\n    3. remove-redirect\n    4. retire-tunnels\n"
	if exitCode(err) != 1 || !strings.Contains(out, want) {
		t.Fatalf("recover: exit %d\n%s\nwant\n%s", exitCode(err), out, want)
	}
	out, _, err = execute(t, newRecoverCmd(), "--socket", sock, "--apply")
	if exitCode(err) != 1 || !strings.Contains(out, "error: the migrator cannot recover migrations") {
		t.Fatalf("recover --apply: exit %d\n%s", exitCode(err), out)
	}
}

func TestVersionCmd(t *testing.T) {
	sock := daemonWith(t, t.TempDir(), nil)
	out, _, err := execute(t, newVersionCmd(), "--socket", sock)
	if err != nil || !regexp.MustCompile(`^vmhop \S+ \(peer protocol \d+\)\nvmhopd \S+ \(peer protocol \d+\) at `).MatchString(out) {
		t.Fatalf("version: %v\n%s", err, out)
	}
	out, _, err = execute(t, newVersionCmd(), "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if err != nil || !strings.Contains(out, "vmhopd: not reached:") {
		t.Fatalf("version without vmhopd: %v\n%s", err, out)
	}
}

// dryRunner is a Migrator with a preflight.
type dryRunner struct {
	daemon.MigratorFunc
	refuse error
}

func (d dryRunner) Preflight(context.Context, *daemon.Job) (any, error) {
	return map[string]any{"dns_wait_ms": 300000}, d.refuse
}

// TestMigrateDryRun: --dry-run runs the preflight only: exit 0 when it
// passes, 1 with its reason when it refuses; no migration is started.
func TestMigrateDryRun(t *testing.T) {
	ran := false
	m := daemon.MigratorFunc(func(context.Context, *daemon.Job) (any, error) { ran = true; return nil, nil })
	sock := daemonWith(t, t.TempDir(), dryRunner{MigratorFunc: m})
	out, _, err := execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--dry-run", "--socket", sock)
	if err != nil || !strings.Contains(out, "preflight of ../../configs/migration.yaml passed: nothing was changed") || !strings.Contains(out, `"dns_wait_ms": 300000`) {
		t.Fatalf("dry run: %v\n%s", err, out)
	}
	sock = daemonWith(t, t.TempDir(), dryRunner{MigratorFunc: m, refuse: errors.New("preflight: host B does not hold its WAN address")})
	_, _, err = execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--dry-run", "--socket", sock)
	if exitCode(err) != migrator.ExitAborted || !strings.Contains(err.Error(), "does not hold its WAN address") {
		t.Fatalf("refused dry run: exit %d, %v", exitCode(err), err)
	}
	if st, _ := daemon.NewLocalClient(sock).Status(context.Background()); ran || len(st.Migrations) != 0 {
		t.Fatalf("a dry run started a migration: %+v", st.Migrations)
	}
}

// TestLiveView: the terminal display draws a bar per stream with the
// round or pass, rate and ETA, and phase lines between.
func TestLiveView(t *testing.T) {
	var b bytes.Buffer
	v := newLiveView(&b)
	v.width = 20
	data := func(d daemon.ProgressData) json.RawMessage { j, _ := json.Marshal(d); return j }
	for _, ev := range []daemon.Event{
		{Phase: "disk-bulk", Message: "started"},
		{Phase: "disk-bulk", Data: data(daemon.ProgressData{Kind: "disk", Round: 2, DoneBytes: 1 << 20, TotalBytes: 4 << 20, RateBitsPerS: 80e6, ETAMS: 3000})},
		{Phase: "disk-bulk", Message: "done in 2s"},
		{Phase: "memory", Data: data(daemon.ProgressData{Kind: "memory", Pass: 3, DoneBytes: 5 << 20, TotalBytes: 64 << 20, RemainingBytes: 1 << 20, RateBitsPerS: 8e6, ETAMS: 1048})},
		{Message: "migration succeeded", Result: &daemon.Result{OK: true}},
	} {
		v.event(ev)
	}
	v.finish()
	out := b.String()
	for _, want := range []string{"disk-bulk      started", "disk round 2, 80.0 Mbit/s, ETA 3s", "memory pass 3, 1.0 MiB left, 8.0 Mbit/s, ETA 1s",
		"migration succeeded", "1.0/4.0 MiB", "5.0/64 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("display lacks %q:\n%q", want, out)
		}
	}
	if i, j := strings.Index(out, "disk round 2"), strings.Index(out, "done in 2s"); i < 0 || j < i {
		t.Errorf("the phase line is not after the disk bar:\n%q", out)
	}
}
