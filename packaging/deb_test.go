package packaging

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// nfpmModule is the nfpm the Makefile runs (NFPM ?= ...), so the test
// builds the package with the same tool `make deb` uses.
func nfpmModule(t *testing.T) string {
	t.Helper()
	mk, err := os.ReadFile("../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^NFPM \?= (\S+)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("Makefile: no NFPM ?= line")
	}
	return string(m[1])
}

// TestDebPackage builds the Debian package as `make deb` does (fresh
// vmhop and vmhopd, nfpm from the Go module proxy), unpacks it into a
// scratch root with dpkg -x and checks each file's path and mode, the
// conffile, the maintainer scripts, that the unit's ExecStart names the
// packaged vmhopd, and that the packaged vmhop accepts the packaged
// example configs.
func TestDebPackage(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds both binaries and the package (~30 s)")
	}
	for _, tool := range []string{"dpkg-deb", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: the package cannot be built or unpacked here (install dpkg: scripts/install-deps.sh)", tool)
		}
	}
	work := t.TempDir()
	bin := filepath.Join(work, "bin")
	for _, c := range []string{"vmhop", "vmhopd"} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(bin, c), "../cmd/"+c).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", c, err, out)
		}
	}
	dist := filepath.Join(work, "dist")
	nfpm := exec.Command("go", "run", nfpmModule(t), "package", "-f", "packaging/nfpm.yaml", "-p", "deb", "-t", dist+"/")
	nfpm.Dir = ".."
	nfpm.Env = append(os.Environ(), "VMHOP_BIN="+bin, "VMHOP_DEB_VERSION=0.1.0~test1")
	os.MkdirAll(dist, 0o755)
	if out, err := nfpm.CombinedOutput(); err != nil {
		if strings.Contains(string(out), "dial tcp") || strings.Contains(string(out), "GOPROXY=off") {
			t.Skipf("nfpm cannot be fetched from the Go module proxy (offline?): %s", out)
		}
		t.Fatalf("nfpm: %v\n%s", err, out)
	}
	deb := filepath.Join(dist, "vmhop_0.1.0~test1_amd64.deb")
	if out, err := exec.Command("dpkg-deb", "-f", deb, "Package", "Version", "Architecture").CombinedOutput(); err != nil ||
		string(out) != "Package: vmhop\nVersion: 0.1.0~test1\nArchitecture: amd64\n" {
		t.Fatalf("dpkg-deb -f: %v\n%s", err, out)
	}
	root := filepath.Join(work, "root")
	if out, err := exec.Command("dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{
		{"usr/bin/vmhop", 0o755},
		{"usr/bin/vmhopd", 0o755},
		{"usr/lib/systemd/system/vmhopd.service", 0o644},
		{"etc/vmhop/vmhopd.yaml", 0o644},
		{"etc/vmhop/tls", os.ModeDir | 0o700},
		{"usr/share/doc/vmhop/README.md", 0o644},
		{"usr/share/doc/vmhop/architecture.md", 0o644},
		{"usr/share/doc/vmhop/copyright", 0o644},
		{"usr/share/doc/vmhop/examples/vmhopd.yaml", 0o644},
		{"usr/share/doc/vmhop/examples/migration.yaml", 0o644},
	} {
		fi, err := os.Stat(filepath.Join(root, f.path))
		if err != nil {
			t.Errorf("/%s: %v", f.path, err)
		} else if fi.Mode() != f.mode {
			t.Errorf("/%s: mode %v, want %v", f.path, fi.Mode(), f.mode)
		}
	}
	for _, f := range []string{"../configs/vmhopd.service", "../configs/vmhopd.yaml", "../README.md"} {
		want, _ := os.ReadFile(f)
		got, _ := os.ReadFile(filepath.Join(root, map[string]string{
			"../configs/vmhopd.service": "usr/lib/systemd/system/vmhopd.service",
			"../configs/vmhopd.yaml":    "etc/vmhop/vmhopd.yaml",
			"../README.md":              "usr/share/doc/vmhop/README.md",
		}[f]))
		if string(got) != string(want) || len(want) == 0 {
			t.Errorf("packaged copy of %s differs from the repository's", f)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(root, "usr/lib/systemd/system/vmhopd.service"))
	m := regexp.MustCompile(`(?m)^ExecStart=(\S+) `).FindSubmatch(unit)
	if m == nil {
		t.Fatal("unit: no ExecStart")
	}
	if fi, err := os.Stat(filepath.Join(root, string(m[1]))); err != nil || fi.Mode()&0o111 == 0 {
		t.Errorf("unit's ExecStart %s is not an executable in the package: %v", m[1], err)
	}

	// Control files: the config is a conffile; the scripts are executable.
	ctl := filepath.Join(work, "control")
	if out, err := exec.Command("dpkg-deb", "-e", deb, ctl).CombinedOutput(); err != nil {
		t.Fatalf("dpkg-deb -e: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(filepath.Join(ctl, "conffiles")); string(b) != "/etc/vmhop/vmhopd.yaml\n" {
		t.Errorf("conffiles = %q", b)
	}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		if fi, err := os.Stat(filepath.Join(ctl, s)); err != nil || fi.Mode()&0o111 == 0 {
			t.Errorf("maintainer script %s: %v", s, err)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(ctl, "postinst")); !strings.Contains(string(b), "groupadd --system vmhop") {
		t.Error("postinst does not create group vmhop")
	}

	// The packaged CLI accepts the packaged example configs.
	out, err := exec.Command(filepath.Join(root, "usr/bin/vmhop"), "config", "check",
		filepath.Join(root, "etc/vmhop/vmhopd.yaml"), filepath.Join(root, "usr/share/doc/vmhop/examples/migration.yaml")).CombinedOutput()
	if err != nil {
		t.Errorf("packaged vmhop config check: %v\n%s", err, out)
	}
}
