// Package lab builds vmhop's test world on one machine: network namespaces as
// hosts (a client, two sites, a DNS server), a WAN router between them with
// emulated delay, rate and loss on each access link, a real BIND9, and QEMU
// guests. Everything it creates is named after the lab, so several labs can
// run at once and Down (or a sweep after a crash) removes all of it.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmhop/vmhop/internal/lab/wanem"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/internal/units"
)

// Hosts of a lab. Each is a network namespace named NSPrefix+name+"-"+host.
const (
	Client = "client" // where clients run and packets are captured
	SiteA  = "siteA"  // host A: the VM starts here
	SiteB  = "siteB"  // host B: the VM moves here
	DNS    = "dns"    // authoritative BIND9 for Zone
	WAN    = "wan"    // the router joining them
	Wire   = "wire"   // holds the WAN emulator's veths, between hosts and router
)

// NSPrefix starts every namespace a lab creates.
const NSPrefix = "vh-"

// Addresses in every lab (labs are isolated from each other, so they repeat).
var (
	ClientIP = netip.MustParseAddr("10.0.0.2")
	DNSIP    = netip.MustParseAddr("10.0.3.2")
	HostA    = netip.MustParseAddr("10.1.0.2")  // host A's address on site A's LAN, also its WAN address
	HostB    = netip.MustParseAddr("10.2.0.2")  // host B's
	GatewayA = netip.MustParseAddr("10.1.0.1")  // site A's router (the VM's default gateway)
	GatewayB = netip.MustParseAddr("10.2.0.1")  // site B's router
	OldIP    = netip.MustParseAddr("10.1.0.10") // the VM's public address at site A
	NewIP    = netip.MustParseAddr("10.2.0.10") // its address once at site B

	// IPv6: every lab is dual-stack; each LAN has a /64 (fd00:N:: for
	// 10.N.0.0/24; the client's is fd00:10::), the router at ::1. The
	// tunnel between the hosts stays IPv4.
	ClientIP6 = netip.MustParseAddr("fd00:10::2")
	HostA6    = netip.MustParseAddr("fd00:1::2")
	HostB6    = netip.MustParseAddr("fd00:2::2")
	GatewayA6 = netip.MustParseAddr("fd00:1::1")  // site A's router: the guest's IPv6 gateway
	OldIP6    = netip.MustParseAddr("fd00:1::10") // the VM's IPv6 address at site A
	NewIP6    = netip.MustParseAddr("fd00:2::10") // its IPv6 address once at site B

	// A second VM (Svc2Name), for migrations of two VMs at once.
	OldIP2  = netip.MustParseAddr("10.1.0.11")  // the second VM's address at site A
	NewIP2  = netip.MustParseAddr("10.2.0.11")  // its address once at site B
	OldIP62 = netip.MustParseAddr("fd00:1::11") // its IPv6 address at site A
)

// DNS names the lab's BIND serves.
const (
	Zone    = "example."
	SvcName = "svc.example."
	// Svc6Name is the dual-stack VM's name: A OldIP and AAAA OldIP6, TTL
	// SvcTTL (svc has no AAAA, so IPv4-only migrations flip it alone).
	Svc6Name = "svc6.example."
	// Svc2Name is the second VM's name: A OldIP2, TTL SvcTTL.
	Svc2Name = "svc2.example."
	KeyName  = "vmhop-lab."
	// SvcTTL is svc's TTL in the lab's zone, in seconds. A migration waits
	// it out after lowering it (dns-prepare), so it is short, like a
	// service's TTL kept low by an operator who moves it; the rest of the
	// zone has 300.
	SvcTTL = 10
)

// Profile emulates one access link; see wanem.Profile.
type Profile = wanem.Profile

// Config describes a lab to build.
type Config struct {
	// Name is 1-8 lowercase letters or digits; it is in every namespace name.
	Name string
	// Dir holds state, logs, BIND's files and VM files; default /run/vmhop/lab/NAME.
	Dir string
	// Links emulate each host's access link to the WAN router, both directions
	// alike. A zero profile is a plain veth. Hosts without an entry get none.
	Links map[string]wanem.Profile
	// Owner is the pid of the process that owns the lab (tests). When it is
	// dead, SweepStale removes the lab. Zero: owned by the operator.
	Owner int
}

// DefaultLinks is the standard WAN: 20 ms one way and 100 Mbit/s between the
// sites (10 ms on each site's link), 5 ms from the client to the WAN.
func DefaultLinks() map[string]wanem.Profile {
	site := wanem.Profile{Delay: 10 * time.Millisecond, Rate: 100 * units.Mbit}
	return map[string]wanem.Profile{
		SiteA:  site,
		SiteB:  site,
		Client: {Delay: 5 * time.Millisecond},
	}
}

// RootDir holds one directory per lab.
const RootDir = "/run/vmhop/lab"

var nameRE = regexp.MustCompile(`^[a-z0-9]{1,8}$`)

// Lab is a built lab.
type Lab struct {
	Name  string
	Dir   string
	State State

	procMu sync.Mutex
	procs  map[string]*Proc // the VMs this process started, by machine name
}

// State is what Down and status need after the process that built the lab is gone.
type State struct {
	Name    string                   `json:"name"`
	Owner   int                      `json:"owner,omitempty"`
	Created time.Time                `json:"created"`
	Links   map[string]wanem.Profile `json:"links"`
	VMs     map[string]*VM           `json:"vms,omitempty"`
}

// NS returns the namespace name of host in this lab.
func (l *Lab) NS(host string) string { return nsName(l.Name, host) }

func nsName(lab, host string) string { return NSPrefix + lab + "-" + host }

// Path returns a file path inside the lab's directory.
func (l *Lab) Path(elem ...string) string { return filepath.Join(append([]string{l.Dir}, elem...)...) }

// KeyFile is the BIND-format TSIG key file that may update Zone.
func (l *Lab) KeyFile() string { return l.Path("tsig.key") }

// Up builds a lab. If a lab of that name exists (a crash left it, say), it is
// removed first. On error everything built so far is removed.
func Up(ctx context.Context, cfg Config) (l *Lab, err error) {
	if !nameRE.MatchString(cfg.Name) {
		return nil, fmt.Errorf("lab name %q: want 1-8 lowercase letters or digits", cfg.Name)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("lab up: needs root (network namespaces, veths, BPF)")
	}
	if cfg.Dir == "" {
		cfg.Dir = filepath.Join(RootDir, cfg.Name)
	}
	if cfg.Links == nil {
		cfg.Links = DefaultLinks()
	}
	if err := Down(cfg.Name, cfg.Dir); err != nil {
		return nil, fmt.Errorf("remove earlier lab %q: %w", cfg.Name, err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	l = &Lab{Name: cfg.Name, Dir: cfg.Dir, State: State{
		Name: cfg.Name, Owner: cfg.Owner, Created: time.Now().UTC(), Links: cfg.Links, VMs: map[string]*VM{},
	}}
	defer func() {
		if err != nil {
			_ = Down(cfg.Name, cfg.Dir)
			l = nil
		}
	}()
	if err := l.save(); err != nil {
		return nil, err
	}
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"topology", l.buildTopology},
		{"wan emulator", l.startWANEm},
		{"bind9", l.startBIND},
	}
	for _, s := range steps {
		if err := s.fn(ctx); err != nil {
			return nil, fmt.Errorf("lab %s: %s: %w", cfg.Name, s.name, err)
		}
	}
	return l, l.save()
}

// Claim records that namespaces named NSPrefix+name+"-*" belong to the live
// process owner, so SweepStale leaves them alone until it dies (tests'
// scratch namespaces). Down(name, "") removes them and the record.
func Claim(name string, owner int) error {
	l := &Lab{Name: name, Dir: filepath.Join(RootDir, name), State: State{Name: name, Owner: owner, Created: time.Now().UTC()}}
	if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return err
	}
	return l.save()
}

// Open loads a lab built earlier, possibly by another process.
func Open(name string) (*Lab, error) {
	dir := filepath.Join(RootDir, name)
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		return nil, fmt.Errorf("open lab %q: %w (is it up? `vmhop-lab up --name %s`)", name, err, name)
	}
	l := &Lab{Name: name, Dir: dir}
	if err := json.Unmarshal(b, &l.State); err != nil {
		return nil, fmt.Errorf("open lab %q: state.json: %w", name, err)
	}
	if l.State.VMs == nil {
		l.State.VMs = map[string]*VM{}
	}
	return l, nil
}

func (l *Lab) save() error {
	b, err := json.MarshalIndent(l.State, "", "  ")
	if err != nil {
		return err
	}
	tmp := l.Path("state.json.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, l.Path("state.json"))
}

// Down removes lab name: every process inside its namespaces, the namespaces
// (and with them every veth, bridge, tap and BPF program attached there), the
// resolv.conf files and dir. Removing a lab that does not exist is not an error.
func (l *Lab) Down() error { return Down(l.Name, l.Dir) }

// Down removes the lab of that name; dir defaults to RootDir/name.
func Down(name, dir string) error {
	if dir == "" {
		dir = filepath.Join(RootDir, name)
	}
	nss, err := netns.List(NSPrefix + name + "-")
	if err != nil {
		return err
	}
	var errs []error
	for _, ns := range nss {
		if err := killAll(ns); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ns := range nss {
		if err := netns.Delete(ns); err != nil {
			errs = append(errs, err)
		}
		_ = os.RemoveAll(filepath.Join("/etc/netns", ns))
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, err)
	}
	// BPF objects tests pinned for this lab's hosts (their links died with
	// the namespaces; the pins would keep maps alive).
	pins, _ := filepath.Glob(filepath.Join(BPFPinRoot, name+"-*"))
	for _, p := range pins {
		if err := os.RemoveAll(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// BPFPinRoot is where vmhop pins BPF objects; a lab's hosts use
// BPFPinRoot/LAB-HOST.
const BPFPinRoot = "/sys/fs/bpf/vmhop"

// PinDir is where host's datapath pins its maps and links in this lab.
func (l *Lab) PinDir(host string) string { return filepath.Join(BPFPinRoot, l.Name+"-"+host) }

// killAll ends every process in namespace ns: SIGTERM, then SIGKILL after 3 s.
func killAll(ns string) error {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		pids, err := netns.Pids(ns)
		if err != nil || len(pids) == 0 {
			return err
		}
		for _, p := range pids {
			_ = syscall.Kill(p, sig)
		}
		for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if pids, _ := netns.Pids(ns); len(alive(pids)) == 0 {
				return nil
			}
		}
	}
	if pids, _ := netns.Pids(ns); len(alive(pids)) > 0 {
		return fmt.Errorf("netns %q: processes %v survive SIGKILL", ns, pids)
	}
	return nil
}

// alive drops zombies: they hold no namespace resources and their parent reaps them.
func alive(pids []int) []int {
	var out []int
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && len(b) > i+2 && b[i+2] == 'Z' {
			continue
		}
		out = append(out, p)
	}
	return out
}

// List returns the names of the labs that have a state directory.
func List() ([]string, error) {
	ents, err := os.ReadDir(RootDir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, e.Name())
		}
	}
	return out, err
}

// SweepStale removes labs whose owner process has died (a test binary that
// was killed before its cleanup ran), and namespaces of labs with no state.
func SweepStale() error {
	names, err := List()
	if err != nil {
		return err
	}
	var errs []error
	known := map[string]bool{}
	for _, n := range names {
		known[n] = true
		l, err := Open(n)
		if err != nil || (l.State.Owner != 0 && syscall.Kill(l.State.Owner, 0) == syscall.ESRCH) {
			errs = append(errs, Down(n, ""))
		}
	}
	nss, _ := netns.List(NSPrefix)
	for _, ns := range nss {
		rest := strings.TrimPrefix(ns, NSPrefix)
		if i := strings.IndexByte(rest, '-'); i > 0 && !known[rest[:i]] {
			errs = append(errs, Down(rest[:i], ""))
			known[rest[:i]] = true
		}
	}
	return errors.Join(errs...)
}
