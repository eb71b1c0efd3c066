// Package netns creates, enters and removes named network namespaces (the
// ones `ip netns` manages under /var/run/netns) and finds the processes in them.
package netns

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	vns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Dir is where named namespaces are bind-mounted, as iproute2 does.
const Dir = "/var/run/netns"

// Path returns the bind-mount path of the named namespace.
func Path(name string) string { return filepath.Join(Dir, name) }

// Exists reports whether the named namespace exists.
func Exists(name string) bool {
	_, err := os.Stat(Path(name))
	return err == nil
}

// prepareDir makes Dir a shared bind mount of itself, as iproute2's
// `ip netns add` does the first time it runs (netns_add in ip/ipnetns.c).
// Namespace files mounted on the plain directory would be hidden under the
// bind mount that a later `ip netns add` makes, and could no longer be
// unmounted by path; made first, every namespace file lands inside it.
// Idempotent.
func prepareDir() error {
	if err := os.MkdirAll(Dir, 0o755); err != nil {
		return err
	}
	for bound := false; ; bound = true {
		err := unix.Mount("", Dir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if err != unix.EINVAL || bound {
			return fmt.Errorf("make %s a shared mount: %w", Dir, err)
		}
		// Not a mount point yet: bind it onto itself, then share it.
		if err := unix.Mount(Dir, Dir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind mount %s: %w", Dir, err)
		}
	}
}

// Create makes a new named namespace (its file a bind mount inside Dir,
// made a shared mount first, as iproute2 does). The calling thread's
// namespace is unchanged.
func Create(name string) error {
	if err := prepareDir(); err != nil {
		return fmt.Errorf("create netns %q: %w", name, err)
	}
	runtime.LockOSThread()
	orig, err := vns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("create netns %q: %w", name, err)
	}
	defer orig.Close()
	h, err := vns.NewNamed(name)
	if err == nil {
		h.Close()
	}
	if serr := vns.Set(orig); serr != nil {
		// The thread is stuck in the wrong namespace: leave it locked so the
		// runtime discards it when this goroutine exits.
		return fmt.Errorf("create netns %q: restore namespace: %w", name, serr)
	}
	runtime.UnlockOSThread()
	if err != nil {
		return fmt.Errorf("create netns %q: %w", name, err)
	}
	return nil
}

// Delete removes the named namespace. Processes still inside keep it alive
// (without a name); kill them first (see Pids).
func Delete(name string) error {
	if err := vns.DeleteNamed(name); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("delete netns %q: %w", name, err)
	}
	return nil
}

// List returns the named namespaces whose names start with prefix.
func List(prefix string) ([]string, error) {
	ents, err := os.ReadDir(Dir)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Do runs fn on a thread switched into the named namespace. Sockets fn opens
// stay in that namespace after Do returns, which is how tests reach lab hosts.
func Do(name string, fn func() error) error {
	h, err := vns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("open netns %q: %w", name, err)
	}
	defer h.Close()
	runtime.LockOSThread()
	orig, err := vns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := vns.Set(h); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %q: %w", name, err)
	}
	ferr := fn()
	if err := vns.Set(orig); err != nil {
		return fmt.Errorf("leave netns %q: %w", name, err) // thread stays locked: discarded
	}
	runtime.UnlockOSThread()
	return ferr
}

// Handle opens the named namespace for netlink.NewHandleAt and friends.
func Handle(name string) (vns.NsHandle, error) {
	h, err := vns.GetFromName(name)
	if err != nil {
		return h, fmt.Errorf("open netns %q: %w", name, err)
	}
	return h, nil
}

// Command returns a command that runs prog inside the named namespace, via
// `ip netns exec` (which also applies /etc/netns/NAME/resolv.conf).
func Command(ctx context.Context, name, prog string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", name, prog}, args...)...)
}

// CommandNetOnly is Command entering only the network namespace (nsenter
// --net): the program keeps this process's mounts, /sys/fs/bpf among
// them, where `ip netns exec` would remount /sys for the namespace (and
// lose bpffs). For programs that pin BPF objects (vmhopd).
func CommandNetOnly(ctx context.Context, name, prog string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + Path(name), "--", prog}, args...)...)
}

// Run runs prog in the namespace and returns its combined output; the error
// carries the output so a failing step says why.
func Run(ctx context.Context, name, prog string, args ...string) (string, error) {
	out, err := Command(ctx, name, prog, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in netns %q: %w: %s", prog, strings.Join(args, " "), name, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Pids returns the processes whose network namespace is the named one.
func Pids(name string) ([]int, error) {
	var want syscall.Stat_t
	if err := syscall.Stat(Path(name), &want); err != nil {
		return nil, fmt.Errorf("stat netns %q: %w", name, err)
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", p.Name(), "ns/net"), &st) != nil {
			continue // exited meanwhile, or a kernel thread
		}
		if st.Dev == want.Dev && st.Ino == want.Ino {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// DialFunc returns a dial function whose sockets live in the named
// namespace (a socket stays in the namespace it was created in).
func DialFunc(name string) func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		var c net.Conn
		err := Do(name, func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, address)
			return err
		})
		return c, err
	}
}

// Listen listens on a stream address inside the named namespace.
func Listen(name, network, address string) (net.Listener, error) {
	var ln net.Listener
	err := Do(name, func() (err error) { ln, err = net.Listen(network, address); return err })
	return ln, err
}

// ListenPacket listens on a datagram address inside the named namespace.
func ListenPacket(name, network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := Do(name, func() (err error) { pc, err = net.ListenPacket(network, address); return err })
	return pc, err
}
