package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/config"
)

// localOnly is a vmhopd config without tls: the local API only.
func localOnly(t *testing.T) config.Daemon {
	cfg := config.DefaultDaemon()
	cfg.StateDir = t.TempDir()
	cfg.Socket = filepath.Join(t.TempDir(), "run", "vmhopd.sock")
	return cfg
}

func TestLocalSocketPermissions(t *testing.T) {
	cfg := localOnly(t)
	group := ""
	if os.Getuid() == 0 {
		group = "adm" // a group every Debian has; vmhopd's own is "vmhop"
	}
	d := start(t, cfg, Options{SocketGroup: group}, nil)
	if d.PeerAddr() != nil {
		t.Fatalf("peer API listening without tls at %v", d.PeerAddr())
	}
	fi, err := os.Stat(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != os.ModeSocket|0o660 {
		t.Errorf("socket mode %v, want Srw-rw----", fi.Mode())
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != os.Getuid() {
		t.Errorf("socket owner %d, want %d", st.Uid, os.Getuid())
	}
	if group == "" {
		t.Log("not root: the socket's group (chown) is checked as root only")
	} else {
		g, err := user.LookupGroup(group)
		if err != nil {
			t.Fatal(err)
		}
		if strconv.Itoa(int(st.Gid)) != g.Gid {
			t.Errorf("socket group %d, want %s (%s)", st.Gid, g.Gid, group)
		}
	}
	if ents, _ := os.ReadDir(filepath.Dir(cfg.Socket)); len(ents) != 1 {
		t.Errorf("socket directory holds %d entries, want the socket only", len(ents))
	}
	// A second daemon on the same socket is refused while the first answers.
	d2, _ := New(cfg, Options{})
	if err := d2.Listen(); err == nil || !strings.Contains(err.Error(), "another vmhopd answers") {
		t.Fatalf("second daemon: %v", err)
	}
	if _, err := NewLocalClient(cfg.Socket).Status(context.Background()); err != nil {
		t.Fatalf("the first daemon stopped answering: %v", err)
	}
}

func TestLocalSocketReplacesStaleOne(t *testing.T) {
	cfg := localOnly(t)
	os.MkdirAll(filepath.Dir(cfg.Socket), 0o755)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.Socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // a dead daemon's socket file
	start(t, cfg, Options{}, nil)
	if _, err := NewLocalClient(cfg.Socket).Status(context.Background()); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cfg.Socket+".file", nil, 0o644)
	cfg.Socket += ".file"
	d, _ := New(cfg, Options{})
	if err := d.Listen(); err == nil || !strings.HasPrefix(err.Error(), "vmhopd.socket: ") || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("listen over a regular file: %v", err)
	}
}

func TestLocalSocketRemovedOnStop(t *testing.T) {
	cfg := localOnly(t)
	d, err := New(cfg, Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	waitFor(t, func() bool { _, err := os.Stat(cfg.Socket); return err == nil })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("run: %v", err)
	}
	if _, err := os.Stat(cfg.Socket); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after stop: %v", err)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("condition not met in 2 s")
}

func readSpec(t *testing.T) []byte {
	b, err := os.ReadFile("../configs/migration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fakeMigrator emits three phases, then waits for release (if set) and
// returns err.
type fakeMigrator struct {
	release chan struct{}
	err     error
	ctxErr  chan error // gets ctx.Err() if the migration was cancelled
}

type fakeReport struct {
	Digest string `json:"digest"`
}

func (f *fakeMigrator) Migrate(ctx context.Context, job *Job) (any, error) {
	for i, ph := range []string{"datapath", "disk-bulk", "memory"} {
		job.Emit(Event{Phase: ph, Message: fmt.Sprintf("step %d of %s", i, job.Spec.Name), Data: json.RawMessage(`{"n":` + strconv.Itoa(i) + `}`)})
	}
	if f.release != nil {
		select {
		case <-f.release:
		case <-ctx.Done():
			f.ctxErr <- ctx.Err()
			return nil, fmt.Errorf("memory: %w", ctx.Err())
		}
	}
	if f.err != nil {
		return fakeReport{}, f.err
	}
	return fakeReport{Digest: "fe7f2b64c12977af"}, nil
}

func follow(t *testing.T, lc *LocalClient, id string) (phases []string, res *Result, err error) {
	res, err = lc.Follow(context.Background(), id, func(ev Event) error {
		if ev.Result == nil {
			phases = append(phases, ev.Phase)
		}
		return nil
	})
	return phases, res, err
}

func TestLocalMigrate(t *testing.T) {
	cfg := localOnly(t)
	fm := &fakeMigrator{release: make(chan struct{})}
	start(t, cfg, Options{Migrator: fm}, nil)
	lc := NewLocalClient(cfg.Socket)
	ctx := context.Background()
	spec := readSpec(t)
	id, err := lc.Migrate(ctx, spec)
	if err != nil || !strings.HasPrefix(id, "web1-") {
		t.Fatalf("migrate: %q, %v", id, err)
	}
	// The same VM again while the first migration runs: refused.
	if _, err := lc.Migrate(ctx, spec); CodeOf(err) != CodeAlreadyExists {
		t.Fatalf("second migration of the VM: %v, want already_exists", err)
	}
	st, _ := lc.Status(ctx)
	if len(st.Migrations) != 1 || st.Migrations[0].ID != id || st.Migrations[0].State != "running" ||
		st.Migrations[0].Caller.UID != os.Getuid() || st.Migrations[0].Caller.PID != os.Getpid() {
		t.Fatalf("status while running: %+v", st.Migrations)
	}
	// Events arrive while the migration runs (each line flushed): the
	// three phases come before the migration is let go on.
	live := make(chan Event, 8)
	followed := make(chan error, 1)
	go func() {
		_, err := lc.Follow(ctx, id, func(ev Event) error { live <- ev; return nil })
		followed <- err
	}()
	for i := 0; i < 3; i++ {
		select {
		case ev := <-live:
			if ev.Result != nil {
				t.Fatalf("result before the migration was let go: %+v", ev)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("event %d did not arrive while the migration ran", i)
		}
	}
	close(fm.release)
	if ev := <-live; ev.Result == nil || !ev.Result.OK {
		t.Fatalf("last event: %+v", ev)
	}
	if err := <-followed; err != nil {
		t.Fatal(err)
	}
	phases, res, err := follow(t, lc, id)
	if err != nil || fmt.Sprint(phases) != "[datapath disk-bulk memory]" {
		t.Fatalf("follow: %v, %v", phases, err)
	}
	if !res.OK || res.ID != id || res.Name != "web1" || string(res.Report) != `{"digest":"fe7f2b64c12977af"}` {
		t.Fatalf("result = %+v (report %s)", res, res.Report)
	}
	// A late follower sees the same events; the VM may move again.
	if phases, res2, err := follow(t, lc, id); err != nil || len(phases) != 3 || res2.ID != id {
		t.Fatalf("second follow: %v %+v %v", phases, res2, err)
	}
	fm.err = errors.New("memory: migration failed: guest stopped")
	id2, err := lc.Migrate(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	_, res, err = follow(t, lc, id2)
	if err != nil || res.OK || res.Error != "memory: migration failed: guest stopped" {
		t.Fatalf("failed migration: %+v, %v", res, err)
	}
	st, _ = lc.Status(ctx)
	if len(st.Migrations) != 2 || st.Migrations[0].State != "succeeded" || st.Migrations[1].State != "failed" {
		t.Fatalf("status: %+v", st.Migrations)
	}
	if _, err := lc.Follow(ctx, "nosuch-1", func(Event) error { return nil }); CodeOf(err) != CodeNotFound {
		t.Fatalf("follow unknown: %v", err)
	}
}

func TestLocalMigrateRefusesBadSpec(t *testing.T) {
	cfg := localOnly(t)
	start(t, cfg, Options{Migrator: &fakeMigrator{}}, nil)
	lc := NewLocalClient(cfg.Socket)
	bad := strings.Replace(string(readSpec(t)), "new_ip: 10.2.0.10", "new_ip: 10.2.0.300", 1)
	_, err := lc.Migrate(context.Background(), []byte(bad))
	if CodeOf(err) != CodeInvalidArgument || !strings.Contains(err.Error(), `migration.network.new_ip: "10.2.0.300"`) {
		t.Fatalf("bad spec: %v", err)
	}
	daemonCfg, _ := os.ReadFile("../configs/vmhopd.yaml")
	if _, err := lc.Migrate(context.Background(), daemonCfg); CodeOf(err) != CodeInvalidArgument {
		t.Fatalf("a vmhopd config as spec: %v", err)
	}
}

func TestLocalMigrateWithoutMigrator(t *testing.T) {
	cfg := localOnly(t)
	start(t, cfg, Options{}, nil)
	if _, err := NewLocalClient(cfg.Socket).Migrate(context.Background(), readSpec(t)); CodeOf(err) != CodeUnavailable {
		t.Fatalf("migrate without a migrator: %v", err)
	}
}

// TestStopCancelsMigrations: a stopping vmhopd cancels its migrations,
// waits for them, and its followers get the failed result.
func TestStopCancelsMigrations(t *testing.T) {
	cfg := localOnly(t)
	fm := &fakeMigrator{release: make(chan struct{}), ctxErr: make(chan error, 1)}
	d, _ := New(cfg, Options{Migrator: fm, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	if err := d.Listen(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- d.Serve(ctx) }()
	lc := NewLocalClient(cfg.Socket)
	id, err := lc.Migrate(context.Background(), readSpec(t))
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *Result, 1)
	go func() {
		res, _ := lc.Follow(context.Background(), id, func(Event) error { return nil })
		got <- res
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("serve: %v", err)
	}
	if err := <-fm.ctxErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("migration context: %v", err)
	}
	res := <-got
	if res == nil || res.OK || res.Error != "memory: context canceled" {
		t.Fatalf("follower's result: %+v", res)
	}
}
