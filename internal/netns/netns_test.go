package netns

import (
	"bufio"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// mountInfo returns the optional fields (propagation: "shared:N", ...) of
// the topmost mount at path in /proc/self/mountinfo, and whether there is one.
func mountInfo(t *testing.T, path string) (string, bool) {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	found, opts := false, ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 || fields[4] != path {
			continue
		}
		found, opts = true, ""
		for _, o := range fields[6:] {
			if o == "-" {
				break
			}
			opts += o + " "
		}
	}
	return strings.TrimSpace(opts), found
}

// TestCreateBesideIPNetns: namespaces are created inside a shared bind
// mount of Dir, so an `ip netns add` run beside them (which makes that
// mount the first time) cannot hide them: they stay deletable by path.
func TestCreateBesideIPNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, network namespaces): run `sudo make test`")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatal("ip (iproute2) not found: install iproute2 (`bash .ci/run` installs it)")
	}
	const ours, theirs = "vh-nstest-ours", "vh-nstest-ip"
	Delete(ours)
	exec.Command("ip", "netns", "del", theirs).Run()
	if err := Create(ours); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Delete(ours); exec.Command("ip", "netns", "del", theirs).Run() })
	if opts, ok := mountInfo(t, "/run/netns"); !ok || !strings.Contains(opts, "shared:") {
		t.Fatalf("%s after Create: mount point %v, propagation %q; want a shared mount", Dir, ok, opts)
	}
	if out, err := exec.Command("ip", "netns", "add", theirs).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	if err := Delete(ours); err != nil {
		t.Fatalf("delete after ip netns add: %v", err)
	}
	if Exists(ours) {
		t.Fatalf("%s still exists", ours)
	}
	if _, ok := mountInfo(t, "/run/netns/"+ours); ok {
		t.Fatalf("%s is still mounted after Delete", ours)
	}
}
