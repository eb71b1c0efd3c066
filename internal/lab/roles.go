package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vmhop/vmhop/internal/lab/wanem"
	"github.com/vmhop/vmhop/internal/netns"
)

// A lab daemon that must outlive `vmhop-lab up` (the WAN emulator) runs as a
// re-execution of the current binary with roleEnv set. RunChild must be the
// first call in main() and in TestMain of packages that build labs.
const (
	roleEnv = "VMHOP_LAB_ROLE"
	specEnv = "VMHOP_LAB_SPEC"
)

type wanemSpec struct {
	Links []wanemLink `json:"links"`
	Ready string      `json:"ready"` // file created once every socket is open
}

type wanemLink struct {
	A, B    string
	Profile wanem.Profile
}

// RunChild runs the lab role this process was started for, if any, and exits.
func RunChild() {
	role := os.Getenv(roleEnv)
	if role == "" {
		return
	}
	var err error
	switch role {
	case "wanem":
		err = runWANEm(os.Getenv(specEnv))
	default:
		err = fmt.Errorf("unknown lab role %q", role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "lab %s: %v\n", role, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runWANEm(specJSON string) error {
	var spec wanemSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		return fmt.Errorf("spec: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var links []*wanem.Link
	for _, s := range spec.Links {
		l, err := wanem.Open(s.A, s.B, s.Profile, s.Profile)
		if err != nil {
			return err
		}
		links = append(links, l)
	}
	if err := os.WriteFile(spec.Ready, nil, 0o644); err != nil {
		return err
	}
	errc := make(chan error, len(links))
	for _, l := range links {
		go func() { errc <- l.Run(ctx) }()
	}
	var first error
	for range links {
		if err := <-errc; err != nil && first == nil {
			first = err
			stop() // one link failing takes the emulator down: a half-working WAN misleads
		}
	}
	for _, l := range links {
		fmt.Fprintln(os.Stderr, l)
	}
	return first
}

// Proc is a process a lab started.
type Proc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // cmd.Wait's; valid once exited is closed
}

// ExitStatus says how the process ended ("exit status 0", "signal:
// killed"), or "" while it runs.
func (p *Proc) ExitStatus() string {
	if !isClosed(p.exited) {
		return ""
	}
	if p.cmd.ProcessState != nil {
		return p.cmd.ProcessState.String()
	}
	return fmt.Sprint(p.err)
}

// Kill kills the process.
func (p *Proc) Kill() error { return p.cmd.Process.Kill() }

// Exited is closed once the process has exited.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Pid returns the process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// startDaemon starts prog detached (own session, output to logName in the lab
// dir) inside host's namespace, and reaps it if it exits while we run.
func (l *Lab) startDaemon(host, logName string, env []string, prog string, args ...string) (*Proc, error) {
	return l.start(netns.Command(context.Background(), l.NS(host), prog, args...), host, logName, env, prog)
}

// StartNetOnly starts prog detached in host's network namespace only
// (netns.CommandNetOnly: it keeps this process's mounts, /sys/fs/bpf
// among them, for programs that pin BPF objects such as vmhopd), output
// to logName in the lab's directory. Lab down ends it.
func (l *Lab) StartNetOnly(host, logName, prog string, args ...string) (*Proc, error) {
	return l.start(netns.CommandNetOnly(context.Background(), l.NS(host), prog, args...), host, logName, nil, prog)
}

// start starts cmd (prog in host's namespace) in its own session, output
// to the lab's file logName, and reaps it if it exits while we run.
func (l *Lab) start(cmd *exec.Cmd, host, logName string, env []string, prog string) (*Proc, error) {
	logf, err := os.Create(l.Path(logName))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", filepath.Base(prog), host, err)
	}
	p := &Proc{cmd: cmd, exited: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.exited) }()
	return p, nil
}

func (l *Lab) startWANEm(ctx context.Context) error {
	spec := wanemSpec{Ready: l.Path("wanem.ready")}
	for _, a := range accesses {
		if p, ok := l.State.Links[a.host]; ok && p != (wanem.Profile{}) {
			spec.Links = append(spec.Links, wanemLink{A: a.routerIf + "h", B: a.routerIf + "w", Profile: p})
		}
	}
	if len(spec.Links) == 0 {
		return nil
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	b, _ := json.Marshal(spec)
	proc, err := l.startDaemon(Wire, "wanem.log", []string{roleEnv + "=wanem", specEnv + "=" + string(b)}, exe)
	if err != nil {
		return err
	}
	return waitFor(ctx, 10*time.Second, func() error {
		if isClosed(proc.Exited()) {
			return fmt.Errorf("exited: see %s", l.Path("wanem.log"))
		}
		_, err := os.Stat(spec.Ready)
		return err
	})
}

// waitFor polls check until it succeeds, ctx ends or timeout passes, and
// returns the last error from check in the latter cases.
// WaitFor calls check until it returns nil, ctx ends or timeout passes
// (then the last error, wrapped).
func WaitFor(ctx context.Context, timeout time.Duration, check func() error) error {
	return waitFor(ctx, timeout, check)
}

func waitFor(ctx context.Context, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %s: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func execOutput(ctx context.Context, prog string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, prog, args...).CombinedOutput()
	return string(out), err
}
