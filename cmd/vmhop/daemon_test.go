package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/cli"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
)

// fakeDaemon serves vmhopd's local API on a socket in a temp dir, with
// migrations run by migrate; it returns the socket.
func fakeDaemon(t *testing.T, migrate daemon.MigratorFunc) string {
	return fakeDaemonAt(t, filepath.Join(t.TempDir(), "vmhopd.sock"), "", migrate)
}

// fakeDaemonAt is fakeDaemon with the socket at sock, owned by group.
func fakeDaemonAt(t *testing.T, sock, group string, migrate daemon.MigratorFunc) string {
	t.Helper()
	cfg := config.DefaultDaemon()
	cfg.StateDir = t.TempDir()
	cfg.Socket = sock
	d, err := daemon.New(cfg, daemon.Options{Migrator: migrate, SocketGroup: group, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	if err := d.Listen(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- d.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return cfg.Socket
}

// phases emits three phases then fails with fail (nil: succeeds with a digest).
func phases(fail error) daemon.MigratorFunc {
	return func(ctx context.Context, job *daemon.Job) (any, error) {
		for _, ph := range []string{"datapath", "disk-bulk", "memory"} {
			job.Emit(daemon.Event{Phase: ph, Message: "phase"})
		}
		return map[string]string{"digest": "fe7f2b64c12977af"}, fail
	}
}

func TestMigrateFollowsDaemon(t *testing.T) {
	sock := fakeDaemon(t, phases(nil))
	out, _, err := execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--socket", sock)
	if err != nil {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	re := regexp.MustCompile(`(?s)^migration web1-[0-9a-f]{8} started by vmhopd\n` +
		`\S+ datapath +phase\n\S+ disk-bulk +phase\n\S+ memory +phase\n\S+ - +migration succeeded\n` +
		`report:\n\{\n  "digest": "fe7f2b64c12977af"\n\}\n$`)
	if !re.MatchString(out) {
		t.Fatalf("output:\n%s", out)
	}
}

func TestMigrateExitsWithTheMigrationsResult(t *testing.T) {
	sock := fakeDaemon(t, phases(errors.New("memory: guest crashed")))
	out, _, err := execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--socket", sock, "--json")
	var ee cli.ExitError
	if err == nil || !regexp.MustCompile(`^migration web1-[0-9a-f]{8} failed after \S+: memory: guest crashed$`).MatchString(err.Error()) ||
		!errors.As(err, &ee) || ee.Code != migrator.ExitAborted {
		t.Fatalf("migrate: %v, want exit %d", err, migrator.ExitAborted)
	}
	var evs []daemon.Event
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var ev daemon.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("--json line %q: %v", sc.Text(), err)
		}
		evs = append(evs, ev)
	}
	if len(evs) != 4 || evs[2].Phase != "memory" || evs[3].Result == nil || evs[3].Result.OK || evs[3].Result.Error != "memory: guest crashed" {
		t.Fatalf("events: %+v", evs)
	}
}

// TestMigrateExitCodes: the exit code vmhopd computed from the
// migration's error is the command's.
func TestMigrateExitCodes(t *testing.T) {
	for _, tt := range []struct {
		err  error
		code int
	}{
		{nil, migrator.ExitMoved},
		{fmt.Errorf("dns-flip: %w: servfail", migrator.ErrFollowUp), migrator.ExitFollowUp},
		{fmt.Errorf("health: %w", migrator.ErrUnhealthy), migrator.ExitUnhealthy},
	} {
		sock := fakeDaemon(t, phases(tt.err))
		_, _, err := execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--socket", sock)
		code := 0
		var ee cli.ExitError
		if errors.As(err, &ee) {
			code = ee.Code
		} else if err != nil {
			code = 1
		}
		if code != tt.code {
			t.Errorf("migration error %v: exit %d (%v), want %d", tt.err, code, err, tt.code)
		}
	}
}

func TestMigrateWithoutDaemonSaysSo(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	_, _, err := execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--socket", sock)
	if err == nil || !strings.Contains(err.Error(), "vmhopd at "+sock) || !strings.Contains(err.Error(), "is vmhopd running?") {
		t.Fatalf("err = %v", err)
	}
	// A spec with errors is refused before vmhopd is asked, naming the key.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	spec, _ := os.ReadFile("../../configs/migration.yaml")
	os.WriteFile(bad, []byte(strings.Replace(string(spec), "old_ip: 10.1.0.10", "old_ip: nowhere", 1)), 0o644)
	_, _, err = execute(t, newMigrateCmd(), "-f", bad, "--socket", sock)
	var ee cli.ExitError
	if err == nil || !strings.Contains(err.Error(), `migration.network.old_ip: "nowhere"`) || !errors.As(err, &ee) || ee.Code != migrator.ExitUsage {
		t.Fatalf("bad spec: %v, want exit %d", err, migrator.ExitUsage)
	}
}

func TestStatusCmd(t *testing.T) {
	sock := fakeDaemon(t, phases(nil))
	if _, _, err := execute(t, newMigrateCmd(), "-f", "../../configs/migration.yaml", "--socket", sock); err != nil {
		t.Fatal(err)
	}
	out, _, err := execute(t, newStatusCmd(), "--socket", sock)
	if err != nil || !regexp.MustCompile(`peer API \(none: no tls\), peers \[\]\n.*\nweb1-[0-9a-f]{8} +qemu:/run/vmhop/web1.qmp +succeeded `).MatchString(out) {
		t.Fatalf("status: %v\n%s", err, out)
	}
}

// TestCerts makes a CA and two hosts' certificates with the CLI and checks
// that they do mutual TLS for the names given.
func TestCerts(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := execute(t, newCertsCmd(), "ca", "--dir", dir); err != nil {
		t.Fatal(err)
	}
	if _, _, err := execute(t, newCertsCmd(), "ca", "--dir", dir); err == nil || !strings.Contains(err.Error(), "file exists") {
		t.Fatalf("second ca over the first: %v", err)
	}
	for _, h := range []string{"site-a", "site-b"} {
		if _, _, err := execute(t, newCertsCmd(), "host", h, "--dir", dir, "--ip", "10.1.0.2"); err != nil {
			t.Fatal(err)
		}
	}
	if fi, _ := os.Stat(filepath.Join(dir, "ca-key.pem")); fi.Mode().Perm() != 0o600 {
		t.Errorf("ca-key.pem mode %v", fi.Mode())
	}
	if fi, _ := os.Stat(filepath.Join(dir, "site-a-key.pem")); fi.Mode().Perm() != 0o600 {
		t.Errorf("site-a-key.pem mode %v", fi.Mode())
	}
	caPEM, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "site-b.pem"), filepath.Join(dir, "site-b-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pair.Leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "site-b", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	// The files make a daemon config that loads (its cert names it, from its CA).
	cfg := config.DefaultDaemon()
	cfg.Name, cfg.StateDir = "site-a", t.TempDir()
	cfg.TLS = config.TLS{Cert: filepath.Join(dir, "site-a.pem"), Key: filepath.Join(dir, "site-a-key.pem"), CA: filepath.Join(dir, "ca.pem")}
	if _, err := daemon.New(cfg, daemon.Options{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := execute(t, newCertsCmd(), "host", "x", "--dir", t.TempDir()); err == nil || !strings.Contains(err.Error(), "vmhop certs ca") {
		t.Fatalf("host without a CA: %v", err)
	}
}

// TestMigrateAsUnprivilegedUser runs the real vmhop binary as user nobody:
// in the socket's group it migrates without root and exits with the
// migration's result; outside it the socket refuses it.
func TestMigrateAsUnprivilegedUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run vmhop as user nobody: run as root (sudo make test)")
	}
	dir, err := os.MkdirTemp("", "vmhop-cli-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755) // nobody reaches the binary, the spec and the sockets
	bin := filepath.Join(dir, "vmhop")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	spec, _ := os.ReadFile("../../configs/migration.yaml")
	specFile := filepath.Join(dir, "migration.yaml")
	os.WriteFile(specFile, spec, 0o644)
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534} // nobody:nogroup, no other groups
	run := func(sock string) (stdout, stderr string, code int) {
		cmd := exec.Command(bin, "migrate", "-f", specFile, "--socket", sock)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
		var o, e strings.Builder
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		var exit *exec.ExitError
		if err != nil && !errors.As(err, &exit) {
			t.Fatal(err)
		}
		return o.String(), e.String(), cmd.ProcessState.ExitCode()
	}

	ok := fakeDaemonAt(t, filepath.Join(dir, "ok.sock"), "nogroup", phases(nil))
	out, errOut, code := run(ok)
	if code != 0 || !strings.Contains(out, "migration succeeded") || !strings.Contains(out, `"digest": "fe7f2b64c12977af"`) {
		t.Fatalf("as nobody in the socket's group: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("vmhop migrate as nobody:\n%s", out)
	if st, err := daemon.NewLocalClient(ok).Status(context.Background()); err != nil || len(st.Migrations) != 1 || st.Migrations[0].Caller.UID != 65534 {
		t.Fatalf("status: %+v, %v; want the migration started by uid 65534", st, err)
	}
	failing := fakeDaemonAt(t, filepath.Join(dir, "fail.sock"), "nogroup", phases(errors.New("memory: guest crashed")))
	out, errOut, code = run(failing)
	if code != 1 || !strings.Contains(out, "migration failed: memory: guest crashed") ||
		!regexp.MustCompile(`^vmhop: migration web1-[0-9a-f]{8} failed after \S+: memory: guest crashed\n$`).MatchString(errOut) {
		t.Fatalf("failed migration: exit %d\n%s%s", code, out, errOut)
	}
	closed := fakeDaemonAt(t, filepath.Join(dir, "root.sock"), "root", phases(nil))
	_, errOut, code = run(closed)
	if code != 1 || !strings.Contains(errOut, "permission denied") {
		t.Fatalf("as nobody outside the socket's group: exit %d: %s", code, errOut)
	}
}
