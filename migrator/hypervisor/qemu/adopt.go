package qemu

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Adopting a running VM: vmhop takes a QEMU VM as it runs, from its QMP
// socket. PeerPID finds the QEMU process serving the socket
// (SO_PEERCRED), Cmdline reads its argument vector from /proc, and
// DestinationArgs turns it into the destination's: the same machine and
// devices (a migration needs them identical), with the host-specific
// parts (disk paths, tap or bridge, QMP socket, pid file, serial file)
// mapped as the migration spec says (destination.disk, destination.tap,
// destination.bridge), and -incoming defer.

// Adopt reads the running VM behind the QMP socket at qmpSocket (its
// process's command line) and builds its destination's arguments by m.
func Adopt(qmpSocket string, m HostMap) (Adopted, error) {
	pid, err := PeerPID(qmpSocket)
	if err != nil {
		return Adopted{}, fmt.Errorf("adopt: %w", err)
	}
	argv, err := Cmdline(pid)
	if err != nil {
		return Adopted{}, fmt.Errorf("adopt: %w", err)
	}
	return DestinationArgs(argv, m)
}

// PeerPID returns the pid of the process listening on the unix socket at
// path: the kernel records the listener's credentials and gives them to
// a client that connects (SO_PEERCRED, unix(7)), even before the server
// accepts. QEMU's QMP serves one client at a time; this connection only
// waits in its backlog and is closed at once.
func PeerPID(path string) (int, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return 0, fmt.Errorf("peer pid of %q: %w", path, err)
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("peer pid of %q: %w", path, err)
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("peer pid of %q: %w", path, err)
	}
	if cerr != nil {
		return 0, fmt.Errorf("peer pid of %q: SO_PEERCRED: %w", path, cerr)
	}
	return int(cred.Pid), nil
}

// Cmdline returns the argument vector of process pid, argv[0] included
// (/proc/PID/cmdline: NUL-separated).
func Cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil, fmt.Errorf("command line of pid %d: %w", pid, err)
	}
	b = bytes.TrimSuffix(b, []byte{0})
	if len(b) == 0 {
		return nil, fmt.Errorf("command line of pid %d: empty (a kernel thread, or the process exited)", pid)
	}
	return strings.Split(string(b), "\x00"), nil
}

// HostMap says how the source's host-specific arguments become the
// destination's. Paths are on the destination host.
type HostMap struct {
	// Disks maps each source image path to the destination's
	// (destination.disk). A disk without an entry is an error.
	Disks map[string]string
	// Taps maps each source tap (-netdev tap,ifname=) to the
	// destination's (destination.tap); the key "" maps a VM's only tap,
	// whatever its name (a second tap is then an error). Bridge replaces the bridge of
	// -netdev bridge,br= (destination.bridge). An unmapped one is an error.
	Taps   map[string]string
	Bridge string
	// QMPSocket is the destination QEMU's QMP socket (replacing the
	// source's -qmp unix:, or the path of the socket chardev it names).
	QMPSocket string
	// PidFile and Console replace -pidfile and -serial file:; "" drops
	// -pidfile and makes the serial port -serial null (the device stays:
	// the destination must have the source's devices).
	PidFile, Console string
	// Name replaces -name ("" keeps the source's).
	Name string
}

// Adopted is what DestinationArgs read from the source's command line.
type Adopted struct {
	Program string   // argv[0], e.g. "qemu-system-x86_64"
	Args    []string // the destination's arguments, -incoming defer last
	MACs    []string // NIC MAC addresses, in order: they move with the VM
	Disks   []string // source image paths found
	Taps    []string // source taps found
}

// flags are QEMU options that take no value (qemu-options.hx, without
// HAS_ARG); any other option takes the next argument.
var flags = map[string]bool{
	"nodefaults": true, "no-user-config": true, "no-reboot": true, "no-shutdown": true, "S": true,
	"daemonize": true, "snapshot": true, "enable-kvm": true, "nographic": true, "no-hpet": true,
	"no-acpi": true, "full-screen": true, "enable-fips": true, "preconfig": true, "only-migratable": true,
	"no-fd-bootchk": true, "win2k-hack": true, "no-quit": true, "version": true, "help": true,
}

// DestinationArgs builds the destination QEMU's arguments from the
// source's argument vector argv (argv[0] first, as Cmdline returns it),
// mapping what is host-specific by m. Everything else is kept as is:
// files it names (kernel, firmware) must exist at the same paths on the
// destination. Dropped: -daemonize and -S (the destination waits for the
// stream, supervised), the source's own -incoming; appended: -incoming
// defer.
func DestinationArgs(argv []string, m HostMap) (Adopted, error) {
	var a Adopted
	if len(argv) == 0 {
		return a, errors.New("adopt: empty command line")
	}
	a.Program = argv[0]
	qmpChardev := "" // id of a socket chardev that -mon/-qmp use
	for i := 1; i < len(argv); i++ {
		if (argv[i] == "-mon" || argv[i] == "--mon") && i+1 < len(argv) {
			if id, ok := opts(argv[i+1]).get("chardev"); ok {
				qmpChardev = id
			}
		}
	}
	for i := 1; i < len(argv); i++ {
		arg := argv[i]
		if !strings.HasPrefix(arg, "-") {
			return a, fmt.Errorf("adopt: argument %d %q: not an option", i, arg)
		}
		name := strings.TrimLeft(arg, "-")
		if flags[name] {
			if name != "daemonize" && name != "S" {
				a.Args = append(a.Args, arg)
			}
			continue
		}
		if i+1 >= len(argv) {
			return a, fmt.Errorf("adopt: option %q has no value", arg)
		}
		i++
		val := argv[i]
		var err error
		switch name {
		case "incoming":
			continue
		case "name":
			if m.Name != "" {
				val = m.Name
			}
		case "pidfile":
			if m.PidFile == "" {
				continue
			}
			val = m.PidFile
		case "serial":
			if strings.HasPrefix(val, "file:") {
				val = "file:" + m.Console
				if m.Console == "" {
					val = "null"
				}
			}
		case "qmp":
			if path, ok := strings.CutPrefix(val, "unix:"); ok {
				p, rest, _ := strings.Cut(path, ",")
				if m.QMPSocket == "" {
					return a, fmt.Errorf("adopt: -qmp unix:%s: no destination QMP socket", p)
				}
				val = "unix:" + m.QMPSocket
				if rest != "" {
					val += "," + rest
				}
			}
		case "chardev":
			o := opts(val)
			if id, _ := o.get("id"); id == qmpChardev && qmpChardev != "" {
				if m.QMPSocket == "" {
					return a, fmt.Errorf("adopt: -chardev %s: no destination QMP socket", id)
				}
				val = o.set("path", m.QMPSocket).String()
			}
		case "blockdev", "drive":
			val, err = a.mapDisk(name, val, m)
		case "netdev":
			val, err = a.mapNet(val, m)
		case "device", "net":
			for _, key := range []string{"mac", "macaddr"} {
				if mac, ok := opts(val).get(key); ok {
					a.MACs = append(a.MACs, mac)
				}
			}
		}
		if err != nil {
			return a, err
		}
		a.Args = append(a.Args, arg, val)
	}
	a.Args = append(a.Args, "-incoming", "defer")
	return a, nil
}

// mapDisk maps the image path of a -blockdev or -drive (key=value or,
// as libvirt writes -blockdev, JSON).
func (a *Adopted) mapDisk(opt, val string, m HostMap) (string, error) {
	key := "filename"
	if opt == "drive" {
		key = "file"
	}
	if strings.HasPrefix(val, "{") {
		var obj map[string]any
		if err := json.Unmarshal([]byte(val), &obj); err != nil {
			return "", fmt.Errorf("adopt: -%s %q: %w", opt, val, err)
		}
		path, ok := obj[key].(string)
		if !ok || obj["driver"] != "file" {
			return val, nil
		}
		to, err := a.disk(opt, path, m)
		if err != nil {
			return "", err
		}
		oldKV, _ := json.Marshal(map[string]string{key: path})
		newKV, _ := json.Marshal(map[string]string{key: to})
		inner := func(b []byte) string { return string(b[1 : len(b)-1]) } // "filename":"..."
		if !strings.Contains(val, inner(oldKV)) {
			return "", fmt.Errorf("adopt: -%s %q: %s not written as %s", opt, val, key, inner(oldKV))
		}
		return strings.Replace(val, inner(oldKV), inner(newKV), 1), nil
	}
	o := opts(val)
	path, ok := o.get(key)
	if !ok || (opt == "blockdev" && !o.has("driver", "file")) {
		return val, nil // a format node over another node, or no file
	}
	to, err := a.disk(opt, path, m)
	if err != nil {
		return "", err
	}
	return o.set(key, to).String(), nil
}

func (a *Adopted) disk(opt, path string, m HostMap) (string, error) {
	a.Disks = append(a.Disks, path)
	to, ok := m.Disks[path]
	if !ok || to == "" {
		return "", fmt.Errorf("adopt: -%s: image %q has no destination path (destination.disk)", opt, path)
	}
	return to, nil
}

// mapNet maps the tap or bridge of a -netdev.
func (a *Adopted) mapNet(val string, m HostMap) (string, error) {
	o := opts(val)
	switch {
	case o.has("", "tap"):
		if _, ok := o.get("fd"); ok {
			return "", fmt.Errorf("adopt: -netdev %q: a tap passed by file descriptor cannot be mapped; give QEMU ifname= instead", val)
		}
		tap, ok := o.get("ifname")
		if !ok {
			return "", fmt.Errorf("adopt: -netdev %q: tap without ifname", val)
		}
		a.Taps = append(a.Taps, tap)
		to, ok := m.Taps[tap]
		if !ok && len(a.Taps) == 1 {
			to, ok = m.Taps[""] // the VM's only tap
		} else if !ok && m.Taps[""] != "" {
			return "", fmt.Errorf("adopt: -netdev: tap %q is the VM's second: destination.tap maps one tap only", tap)
		}
		if !ok || to == "" {
			return "", fmt.Errorf("adopt: -netdev: tap %q has no destination tap (destination.tap)", tap)
		}
		return o.set("ifname", to).String(), nil
	case o.has("", "bridge"):
		if m.Bridge == "" {
			return "", fmt.Errorf("adopt: -netdev %q: no destination bridge (destination.bridge)", val)
		}
		return o.set("br", m.Bridge).String(), nil
	}
	return val, nil
}

// opts is a QEMU option string: key=value pairs split at commas (",,"
// is a literal comma); a first part without "=" is the implied key ("").
type opts string

func splitOpts(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			out = append(out, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	return append(out, cur.String())
}

func (o opts) parts() []string { return splitOpts(string(o)) }

func (o opts) get(key string) (string, bool) {
	for i, p := range o.parts() {
		k, v, ok := strings.Cut(p, "=")
		if ok && k == key {
			return v, true
		}
		if !ok && i == 0 && key == "" {
			return p, true
		}
	}
	return "", false
}

func (o opts) has(key, val string) bool {
	v, ok := o.get(key)
	return ok && v == val
}

// set replaces key's value (escaping commas as ",,").
func (o opts) set(key, val string) opts {
	ps := o.parts()
	for i, p := range ps {
		if k, _, ok := strings.Cut(p, "="); ok && k == key {
			ps[i] = key + "=" + val
		}
	}
	for i := range ps {
		ps[i] = strings.ReplaceAll(ps[i], ",", ",,")
	}
	return opts(strings.Join(ps, ","))
}

func (o opts) String() string { return string(o) }
