// Package labtest builds labs for tests: it skips with instructions when not
// root, sweeps labs left by killed test binaries, names each lab uniquely (go
// test runs packages in parallel), and removes the lab when the test ends,
// failed or not.
package labtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/netns"
)

// RequireRoot skips t when not root. As root, as in CI, nothing is skipped.
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("lab test: skipped under -short (make unit); make test runs it")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, veths, BPF, QEMU taps): run `sudo make test`")
	}
}

// RequireTools fails t (not skips) when a program the lab needs is missing:
// a lab test that silently does nothing is worse than a red one.
func RequireTools(t testing.TB, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			t.Fatalf("%s not found: install it (`bash .ci/run` installs everything the tests need)", p)
		}
	}
}

// New builds a lab for t, named uniquely and owned by this process, and
// removes it on cleanup. cfg.Name and cfg.Owner are set here.
func New(t testing.TB, cfg lab.Config) *lab.Lab {
	t.Helper()
	RequireRoot(t)
	RequireTools(t, "ip", "ethtool", "named", "qemu-system-x86_64")
	if err := lab.SweepStale(); err != nil {
		t.Logf("sweep stale labs: %v", err)
	}
	b := make([]byte, 3)
	rand.Read(b)
	cfg.Name = "t" + hex.EncodeToString(b)
	cfg.Owner = os.Getpid()
	l, err := lab.Up(context.Background(), cfg)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(func() {
		if os.Getenv("VMHOP_KEEP_LAB") != "" && t.Failed() {
			t.Logf("VMHOP_KEEP_LAB: lab %s kept for debugging; remove it with `vmhop-lab down --name %s`", l.Name, l.Name)
			return
		}
		DownAndAssertGone(t, l)
	})
	return l
}

// DownAndAssertGone removes l and fails t if any of its namespaces, their
// processes or its directory survive.
func DownAndAssertGone(t testing.TB, l *lab.Lab) {
	t.Helper()
	var pids []int
	nss, _ := netns.List(lab.NSPrefix + l.Name + "-")
	for _, ns := range nss {
		p, _ := netns.Pids(ns)
		pids = append(pids, p...)
	}
	if err := l.Down(); err != nil {
		t.Errorf("lab down: %v", err)
	}
	AssertGone(t, l.Name)
	for _, p := range pids {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); err == nil && !strings.Contains(string(b), ") Z ") {
			t.Errorf("lab %s: process %d survived lab down: %s", l.Name, p, b)
		}
	}
}

// AssertGone fails t if anything of lab name is left: a namespace, or a
// process in one, or its directory.
func AssertGone(t testing.TB, name string) {
	t.Helper()
	nss, err := netns.List(lab.NSPrefix + name + "-")
	if err != nil {
		t.Fatal(err)
	}
	if len(nss) > 0 {
		t.Errorf("lab %s: namespaces left: %v", name, nss)
	}
	if _, err := os.Stat(lab.RootDir + "/" + name); err == nil {
		t.Errorf("lab %s: directory left", name)
	}
}

// Netns creates a throwaway network namespace for t, claimed like a lab
// (a sweep by a parallel test leaves it alone; one after this binary died
// removes it), and removed on cleanup.
func Netns(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	b := make([]byte, 3)
	rand.Read(b)
	name := "u" + hex.EncodeToString(b)
	if err := lab.Claim(name, os.Getpid()); err != nil {
		t.Fatal(err)
	}
	ns := lab.NSPrefix + name + "-scratch"
	t.Cleanup(func() { lab.Down(name, "") })
	if err := netns.Create(ns); err != nil {
		t.Fatal(err)
	}
	return ns
}
