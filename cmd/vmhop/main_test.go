package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/internal/config"
)

func execute(t *testing.T, c *cobra.Command, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var o, e bytes.Buffer
	c.SetOut(&o)
	c.SetErr(&e)
	c.SetArgs(args)
	c.SilenceUsage, c.SilenceErrors = true, true
	err = c.Execute()
	return o.String(), e.String(), err
}

func TestConfigCheck(t *testing.T) {
	out, _, err := execute(t, newConfigCmd(), "check", "../../configs/vmhopd.yaml", "../../configs/migration.yaml")
	if err != nil || !strings.Contains(out, "vmhopd.yaml: ok (vmhopd config)") || !strings.Contains(out, "migration.yaml: ok (migration config)") {
		t.Fatalf("good files: %q, %v", out, err)
	}
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte("migration:\n  network: {new_ip: 10.2.0.300, colour: red}\n"), 0o644)
	_, errOut, err := execute(t, newConfigCmd(), "check", bad)
	if err == nil {
		t.Fatal("bad file passed")
	}
	for _, want := range []string{
		`migration.network.new_ip: "10.2.0.300" is not an IPv4 or IPv6 address`,
		`migration.network.colour: unknown key`,
		`migration.vm.disk: required`,
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
}

func TestDNSFlagsNameWhatIsMissing(t *testing.T) {
	_, _, err := execute(t, newDNSCmd(), "show", "--zone", "example.")
	if err == nil || !strings.Contains(err.Error(), "--server: required") {
		t.Fatalf("err = %v", err)
	}
	_, _, err = execute(t, newDNSCmd(), "restore", "--server", "x:53", "--zone", "example.", "--name", "a.example.", "--key-file", "/k")
	if err == nil || !strings.Contains(err.Error(), "--ttl: required for restore") {
		t.Fatalf("err = %v", err)
	}
}

// TestProductBinariesDoNotLinkTheLab: the lab is a test bench in its own
// wing (cmd/vmhop-lab); the operator's CLI and the daemon never link it.
func TestProductBinariesDoNotLinkTheLab(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "../../cmd/vmhop", "../../cmd/vmhopd").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/vmhop/vmhop/internal/lab") {
			t.Errorf("a product binary links %s", pkg)
		}
	}
}

// TestConfigCheckVerbose: -v prints every effective value with its unit,
// defaults included.
func TestConfigCheckVerbose(t *testing.T) {
	out, _, err := execute(t, newConfigCmd(), "check", "-v", "../../configs/migration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"  migration.limits.bandwidth = 100mbit (100000000 bit/s = 12.5 MB/s)\n",
		"  migration.storage.chunk_size = 1MiB (1048576 bytes)\n",
		"  migration.dns.ttl = 5 seconds\n",
		"  migration.limits.downtime = 300ms\n",
		"  migration.network.new_ip = 10.2.0.10\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	f, err := config.Load("../../configs/migration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if n, want := strings.Count(out, "\n  migration."), len(f.Effective()); n != want || want < 30 {
		t.Errorf("%d values printed, want the schema's %d:\n%s", n, want, out)
	}
}

// TestDNSAddrsDeduplicated: "--new a,a" is one address, so the flip writes
// and verifies one record.
func TestDNSAddrsDeduplicated(t *testing.T) {
	f := dnsFlags{old: []string{"10.1.0.10"}, new: []string{"10.2.0.10", " 10.2.0.10", "::ffff:10.2.0.10", "10.2.0.11"}}
	old, nw, err := f.addrs()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(old) != "[10.1.0.10]" || fmt.Sprint(nw) != "[10.2.0.10 10.2.0.11]" {
		t.Fatalf("old %v new %v, want [10.1.0.10] and [10.2.0.10 10.2.0.11]", old, nw)
	}
}
