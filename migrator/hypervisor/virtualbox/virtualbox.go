// Package virtualbox migrates a VirtualBox VM with teleporting, driving
// VBoxManage (7.x syntax). VirtualBox cannot be installed on vmhop's test
// machines: this driver is contract-tested against a fake VBoxManage
// (testdata/fakevbox) that checks the exact arguments and plays
// VirtualBox's states and output. See the README for checking it on a real
// host.
//
// Order of a move (docs/architecture.md, "VirtualBox"): the disk is copied
// while the VM runs (the chunked engine: VirtualBox has no dirty tracking
// vmhop can read); then the source is paused, the switchover hook sends the
// last delta, verifies it and switches the network, and only then is the
// paused VM teleported. Teleport needs the disk visible on both hosts: the
// destination VM is registered with its own copy at the same path.
package virtualbox

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

// Runner runs VBoxManage with args on one host (locally, or through vmhopd
// on the other host) and returns the command, not yet started.
type Runner func(ctx context.Context, args ...string) *exec.Cmd

// Local runs the VBoxManage at path on this host.
func Local(path string) Runner {
	return func(ctx context.Context, args ...string) *exec.Cmd { return exec.CommandContext(ctx, path, args...) }
}

// Config is one teleport.
type Config struct {
	VM       string // the VM's name (or UUID), registered on both hosts
	Source   Runner
	Dest     Runner
	DestHost string // address the source connects to
	Port     int    // teleporter port on the destination
	// PasswordDir holds the per-migration password file (never on a
	// command line); the driver creates and removes it.
	PasswordDir string
	Poll        time.Duration // state polling; default 200ms
}

// Driver implements hypervisor.Driver for VirtualBox.
type Driver struct {
	cfg      Config
	password string // path of the password file
}

var _ hypervisor.Driver = (*Driver)(nil)

// New returns a driver; nothing runs until PrepareDestination.
func New(cfg Config) *Driver {
	if cfg.Poll == 0 {
		cfg.Poll = 200 * time.Millisecond
	}
	return &Driver{cfg: cfg}
}

// run runs VBoxManage and returns stdout, or an error carrying VirtualBox's
// own message ("VBoxManage: error: ...").
func run(ctx context.Context, r Runner, args ...string) (string, error) {
	cmd := r(ctx, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errb.String())
		if i := strings.Index(msg, "VBoxManage: error:"); i >= 0 {
			msg = strings.TrimSpace(strings.SplitN(msg[i+len("VBoxManage: error:"):], "\n", 2)[0])
		}
		return out.String(), fmt.Errorf("VBoxManage %s: %w: %s", args[0], err, msg)
	}
	return out.String(), nil
}

// State returns the VM's state as showvminfo --machinereadable gives it
// (VMState="running", "paused", "teleportingin", "poweroff", ...).
func State(ctx context.Context, r Runner, vm string) (string, error) {
	out, err := run(ctx, r, "showvminfo", vm, "--machinereadable")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "VMState="); ok {
			return strings.Trim(v, `"`), nil
		}
	}
	return "", fmt.Errorf("showvminfo %s: no VMState", vm)
}

// VMInfo is what vmhop reads of a VM as it runs (showvminfo
// --machinereadable): its state, its NICs (their MACs move with it) and
// its disk images.
type VMInfo struct {
	State string
	NICs  []NIC
	Disks []Disk
}

// NIC is one network adapter (nicN, macaddressN, bridgeadapterN).
type NIC struct {
	Index      int    // N, from 1
	Attachment string // "bridged", "nat", "intnet", ...
	MAC        string // "08:00:27:a1:b2:c3"
	Bridge     string // the host interface, when bridged
}

// Disk is one attached image ("<controller>-<port>-<device>"="<path>").
type Disk struct {
	Slot string // "SATA Controller-0-0"
	Path string
}

// Info reads vm's state, NICs and disks on the host r runs on.
func Info(ctx context.Context, r Runner, vm string) (VMInfo, error) {
	out, err := run(ctx, r, "showvminfo", vm, "--machinereadable")
	if err != nil {
		return VMInfo{}, err
	}
	return ParseInfo(out)
}

// ParseInfo parses showvminfo --machinereadable output: key=value lines,
// keys and string values in double quotes (keys with spaces always).
func ParseInfo(out string) (VMInfo, error) {
	var info VMInfo
	kv := map[string]string{}
	var order []string
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok {
			continue
		}
		k, v = unquote(k), unquote(v)
		kv[k] = v
		order = append(order, k)
	}
	info.State = kv["VMState"]
	if info.State == "" {
		return info, errors.New("showvminfo: no VMState")
	}
	for i := 1; ; i++ {
		att, ok := kv["nic"+strconv.Itoa(i)]
		if !ok {
			break
		}
		if att == "none" {
			continue
		}
		mac, err := colonMAC(kv["macaddress"+strconv.Itoa(i)])
		if err != nil {
			return info, fmt.Errorf("showvminfo: macaddress%d: %w", i, err)
		}
		info.NICs = append(info.NICs, NIC{Index: i, Attachment: att, MAC: mac, Bridge: kv["bridgeadapter"+strconv.Itoa(i)]})
	}
	for _, k := range order {
		if !diskSlotRE.MatchString(k) || strings.Contains(k, "-ImageUUID-") || strings.Contains(k, "-IsEjected") {
			continue
		}
		if v := kv[k]; v != "none" && v != "emptydrive" && v != "" {
			info.Disks = append(info.Disks, Disk{Slot: k, Path: v})
		}
	}
	return info, nil
}

// diskSlotRE matches an attachment key, "<controller name>-<port>-<device>".
var diskSlotRE = regexp.MustCompile(`^.+-\d+-\d+$`)

func unquote(s string) string {
	if u, err := strconv.Unquote(s); err == nil {
		return u
	}
	return s
}

// colonMAC turns VirtualBox's "080027A1B2C3" into "08:00:27:a1:b2:c3".
func colonMAC(s string) (string, error) {
	if len(s) != 12 {
		return "", fmt.Errorf("%q: want 12 hex digits", s)
	}
	if _, err := hex.DecodeString(s); err != nil {
		return "", fmt.Errorf("%q: %w", s, err)
	}
	s = strings.ToLower(s)
	return s[0:2] + ":" + s[2:4] + ":" + s[4:6] + ":" + s[6:8] + ":" + s[8:10] + ":" + s[10:12], nil
}

func (d *Driver) waitState(ctx context.Context, r Runner, want string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		s, err := State(ctx, r, d.cfg.VM)
		if err == nil && s == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vm %s: state %q, want %q (after %s): %v", d.cfg.VM, s, want, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d.cfg.Poll):
		}
	}
}

// PrepareDestination writes the password file, configures the destination
// VM as a teleporter target and starts it; it waits in "teleportingin".
func (d *Driver) PrepareDestination(ctx context.Context) error {
	b := make([]byte, 24)
	rand.Read(b)
	if err := os.MkdirAll(d.cfg.PasswordDir, 0o700); err != nil {
		return err
	}
	d.password = filepath.Join(d.cfg.PasswordDir, "teleport.password")
	if err := os.WriteFile(d.password, []byte(hex.EncodeToString(b)), 0o600); err != nil {
		return err
	}
	if _, err := run(ctx, d.cfg.Dest, "modifyvm", d.cfg.VM, "--teleporter", "on",
		"--teleporter-port", strconv.Itoa(d.cfg.Port), "--teleporter-address", d.cfg.DestHost,
		"--teleporter-password-file", d.password); err != nil {
		return fmt.Errorf("prepare destination: %w", err)
	}
	if _, err := run(ctx, d.cfg.Dest, "startvm", d.cfg.VM, "--type", "headless"); err != nil {
		return fmt.Errorf("prepare destination: %w", err)
	}
	return d.waitState(ctx, d.cfg.Dest, "teleportingin", 60*time.Second)
}

var percentRE = regexp.MustCompile(`(\d{1,3})%`)

// Migrate pauses the source, runs the switchover hook, then teleports the
// paused VM with --maxdowntime. Progress comes from VBoxManage's own
// "10%...20%" output. Bandwidth and iteration limits have no VirtualBox
// equivalent and are ignored; Deadline bounds the teleport.
func (d *Driver) Migrate(ctx context.Context, opts hypervisor.Options, progress chan<- hypervisor.Progress, switchover hypervisor.Switchover) (hypervisor.Result, error) {
	var res hypervisor.Result
	start := time.Now()
	if _, err := run(ctx, d.cfg.Source, "controlvm", d.cfg.VM, "pause"); err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	paused := time.Now()
	t0 := time.Now()
	if err := switchover(ctx); err != nil {
		return res, d.abort(fmt.Errorf("%w: %v", hypervisor.ErrSwitchover, err))
	}
	res.Hook = time.Since(t0)
	if opts.Deadline > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, opts.Deadline)
		defer cancel()
	}
	cmd := d.cfg.Source(ctx, "controlvm", d.cfg.VM, "teleport", "--host", d.cfg.DestHost,
		"--port", strconv.Itoa(d.cfg.Port), "--maxdowntime", strconv.FormatInt(max(1, opts.Downtime.Milliseconds()), 10),
		"--passwordfile", d.password)
	pr, pw := io.Pipe()
	var errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = pw, io.MultiWriter(pw, &errb)
	if err := cmd.Start(); err != nil {
		return res, d.abort(fmt.Errorf("migrate: teleport: %w", err))
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait(); pw.Close() }()
	sc := bufio.NewScanner(pr)
	sc.Split(scanPercent)
	for sc.Scan() {
		if m := percentRE.FindStringSubmatch(sc.Text()); m != nil && progress != nil {
			pct, _ := strconv.Atoi(m[1])
			select {
			case progress <- hypervisor.Progress{Status: "teleporting", Elapsed: time.Since(start), Transferred: uint64(pct), Total: 100}:
			default:
			}
		}
	}
	if err := <-done; err != nil {
		cause := hypervisor.ErrDestinationFailed
		if ctx.Err() != nil {
			cause = hypervisor.ErrCancelled
		}
		msg := strings.TrimSpace(errb.String())
		if i := strings.Index(msg, "VBoxManage: error:"); i >= 0 {
			msg = strings.TrimSpace(strings.SplitN(msg[i+len("VBoxManage: error:"):], "\n", 2)[0])
		}
		return res, d.abort(fmt.Errorf("%w: teleport: %v: %s", cause, err, msg))
	}
	res.Total = time.Since(start)
	res.Downtime = time.Since(paused) // the source was paused for the hook and the teleport
	if err := d.waitState(context.Background(), d.cfg.Dest, "running", 30*time.Second); err != nil {
		return res, fmt.Errorf("%w: %v", hypervisor.ErrDestinationFailed, err)
	}
	os.Remove(d.password)
	return res, nil
}

// scanPercent splits VBoxManage's progress ("0%...10%...") into tokens at
// dots and newlines.
func scanPercent(data []byte, atEOF bool) (int, []byte, error) {
	for i, c := range data {
		if c == '.' || c == '\n' {
			return i + 1, data[:i], nil
		}
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// abort resumes the source if it is paused and returns cause.
func (d *Driver) abort(cause error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if s, err := State(ctx, d.cfg.Source, d.cfg.VM); err == nil && s == "paused" {
		if _, err := run(ctx, d.cfg.Source, "controlvm", d.cfg.VM, "resume"); err != nil {
			return errors.Join(cause, fmt.Errorf("and the source stays paused: %w", err))
		}
	}
	return cause
}

// ResumeSource implements hypervisor.Driver. After a completed teleport the
// source VM is powered off, its state gone with the teleport: it cannot be
// resumed, only started again (a reboot).
func (d *Driver) ResumeSource(ctx context.Context) error {
	s, err := State(ctx, d.cfg.Source, d.cfg.VM)
	if err != nil {
		return err
	}
	switch s {
	case "running":
		return nil
	case "paused":
		_, err := run(ctx, d.cfg.Source, "controlvm", d.cfg.VM, "resume")
		return err
	}
	return fmt.Errorf("source vm %s is %q after the teleport: VirtualBox cannot resume it", d.cfg.VM, s)
}

// StopSource implements hypervisor.Driver: a completed teleport left the
// source VM powered off; nothing is left to stop.
func (d *Driver) StopSource(context.Context) error { return nil }

// AbortDestination powers the destination VM off and turns teleporting off.
func (d *Driver) AbortDestination(ctx context.Context) error {
	s, err := State(ctx, d.cfg.Dest, d.cfg.VM)
	if err != nil {
		return err
	}
	if s != "poweroff" && s != "aborted" {
		if _, err := run(ctx, d.cfg.Dest, "controlvm", d.cfg.VM, "poweroff"); err != nil {
			return err
		}
	}
	_, err = run(ctx, d.cfg.Dest, "modifyvm", d.cfg.VM, "--teleporter", "off")
	if d.password != "" {
		os.Remove(d.password)
	}
	return err
}
