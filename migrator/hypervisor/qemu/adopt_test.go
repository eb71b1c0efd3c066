package qemu

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// labMachine is the lab's guest as internal/lab defines it on host
// (paths as a lab named "t1" has them).
func labMachine(host string) Machine {
	dir := "/run/vmhop/lab/t1/"
	id := "vm-" + host
	return Machine{
		Name: id, MemKiB: 128<<10 + 8,
		Kernel: "/var/cache/vmhop/guest/vmlinuz", Initrd: "/var/cache/vmhop/guest/initrd.img",
		Append: "console=ttyS0 quiet panic=-1 vmhop.ip=10.1.0.10/24 vmhop.gw=10.1.0.1 vmhop.rate=20",
		Disk:   dir + id + ".raw", DiskFormat: "raw", Tap: "tap-vm", MAC: "52:54:00:9a:1c:2e",
		QMPSocket: dir + id + ".qmp", Console: dir + id + ".console", PidFile: dir + id + ".pid",
	}
}

func labMap(dst Machine) HostMap {
	return HostMap{
		Disks: map[string]string{labMachine("siteA").Disk: dst.Disk}, Taps: map[string]string{"tap-vm": dst.Tap},
		QMPSocket: dst.QMPSocket, PidFile: dst.PidFile, Console: dst.Console, Name: dst.Name,
	}
}

// TestDestinationArgsLabMachine maps the lab guest's own command line
// (what runs at site A) and must get exactly the destination the lab's
// template makes for site B, -incoming defer included.
func TestDestinationArgsLabMachine(t *testing.T) {
	src, dst := labMachine("siteA"), labMachine("siteB")
	dst.Incoming = "defer"
	sargs, err := src.Args()
	if err != nil {
		t.Fatal(err)
	}
	want, err := dst.Args()
	if err != nil {
		t.Fatal(err)
	}
	a, err := DestinationArgs(append([]string{"qemu-system-x86_64"}, sargs...), labMap(dst))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(a.Args, "\x00"); got != strings.Join(want, "\x00") {
		t.Fatalf("destination args:\n  %q\nwant (the template's):\n  %q", a.Args, want)
	}
	if a.Program != "qemu-system-x86_64" || !slices.Equal(a.MACs, []string{src.MAC}) ||
		!slices.Equal(a.Disks, []string{src.Disk}) || !slices.Equal(a.Taps, []string{"tap-vm"}) {
		t.Fatalf("adopted %s, MACs %v, disks %v, taps %v", a.Program, a.MACs, a.Disks, a.Taps)
	}

	// A VM that already moved once runs with -incoming defer: it is
	// replaced, not repeated.
	again, err := DestinationArgs(append([]string{"qemu-system-x86_64"}, want...), HostMap{
		Disks: map[string]string{dst.Disk: src.Disk}, Taps: map[string]string{"tap-vm": "tap-vm"},
		QMPSocket: src.QMPSocket, PidFile: src.PidFile, Console: src.Console, Name: src.Name})
	if err != nil {
		t.Fatal(err)
	}
	back := src
	back.Incoming = "defer"
	if wantBack, _ := back.Args(); !slices.Equal(again.Args, wantBack) {
		t.Fatalf("moved back:\n  %q\nwant:\n  %q", again.Args, wantBack)
	}
}

// libvirtArgv is a command line as libvirt 9 starts QEMU (JSON
// -blockdev, the QMP monitor as a socket chardev, a bridge helper
// netdev), trimmed.
var libvirtArgv = []string{
	"/usr/bin/qemu-system-x86_64",
	"-name", "guest=web1,debug-threads=on",
	"-S",
	"-object", `{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-3-web1/master-key.aes"}`,
	"-machine", "pc-q35-7.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram",
	"-accel", "kvm",
	"-m", "2048",
	"-object", `{"qom-type":"memory-backend-ram","id":"pc.ram","size":2147483648}`,
	"-smp", "2,sockets=2,cores=1,threads=1",
	"-no-user-config",
	"-nodefaults",
	"-chardev", "socket,id=charmonitor,path=/var/lib/libvirt/qemu/domain-3-web1/monitor.sock,server=on,wait=off",
	"-mon", "chardev=charmonitor,id=monitor,mode=control",
	"-blockdev", `{"driver":"file","filename":"/var/lib/libvirt/images/web1.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}`,
	"-blockdev", `{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage"}`,
	"-device", `{"driver":"virtio-blk-pci","bus":"pci.3","addr":"0x0","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}`,
	"-netdev", "bridge,id=hostnet0,br=virbr0",
	"-device", "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:6b:3c:58,bus=pci.1,addr=0x0",
	"-serial", "file:/var/log/libvirt/qemu/web1-serial.log",
	"-pidfile", "/run/libvirt/qemu/web1.pid",
	"-daemonize",
	"-msg", "timestamp=on",
}

func TestDestinationArgsLibvirt(t *testing.T) {
	a, err := DestinationArgs(libvirtArgv, HostMap{
		Disks:     map[string]string{"/var/lib/libvirt/images/web1.qcow2": "/srv/vm/web1.qcow2"},
		Bridge:    "br0",
		QMPSocket: "/run/vmhop/web1-dest.qmp",
	})
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(a.Args, "\n")
	for _, want := range []string{
		"-chardev\nsocket,id=charmonitor,path=/run/vmhop/web1-dest.qmp,server=on,wait=off",
		`"filename":"/srv/vm/web1.qcow2","node-name":"libvirt-1-storage"`,
		"-netdev\nbridge,id=hostnet0,br=br0",
		"-serial\nnull",
		"-msg\ntimestamp=on\n-incoming\ndefer",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("no %q in:\n%s", want, got)
		}
	}
	for _, gone := range []string{"-S", "-daemonize", "-pidfile"} {
		if slices.Contains(a.Args, gone) {
			t.Errorf("%s left in:\n%s", gone, got)
		}
	}
	for _, gone := range []string{"/var/lib/libvirt/images/web1.qcow2", "monitor.sock", "web1.pid"} {
		if strings.Contains(got, gone) {
			t.Errorf("%s left in:\n%s", gone, got)
		}
	}
	if !slices.Equal(a.MACs, []string{"52:54:00:6b:3c:58"}) || len(a.Args) != len(libvirtArgv)-1-4+2 { // program, -S, -daemonize, -pidfile P; -incoming defer
		t.Errorf("MACs %v; %d args from %d", a.MACs, len(a.Args), len(libvirtArgv))
	}
}

func TestDestinationArgsErrors(t *testing.T) {
	src := labMachine("siteA")
	sargs, _ := src.Args()
	argv := append([]string{"qemu-system-x86_64"}, sargs...)
	for _, c := range []struct {
		name string
		argv []string
		m    HostMap
		want string
	}{
		{"unmapped disk", argv, HostMap{Taps: map[string]string{"tap-vm": "t"}, QMPSocket: "/q"},
			`image "/run/vmhop/lab/t1/vm-siteA.raw" has no destination path (destination.disk)`},
		{"unmapped tap", argv, HostMap{Disks: map[string]string{src.Disk: "/b"}, QMPSocket: "/q"},
			`tap "tap-vm" has no destination tap (destination.tap)`},
		{"no qmp socket", argv, HostMap{Disks: map[string]string{src.Disk: "/b"}, Taps: map[string]string{"tap-vm": "t"}},
			"no destination QMP socket"},
		{"second tap by the only-tap key", []string{"qemu", "-netdev", "tap,id=n0,ifname=a", "-netdev", "tap,id=n1,ifname=b"},
			HostMap{Taps: map[string]string{"": "t"}}, `tap "b" is the VM's second: destination.tap maps one tap only`},
		{"tap by fd", []string{"qemu", "-netdev", "tap,id=n0,fd=23"}, HostMap{},
			"a tap passed by file descriptor cannot be mapped"},
		{"bridge", []string{"qemu", "-netdev", "bridge,id=n0,br=virbr0"}, HostMap{},
			"no destination bridge (destination.bridge)"},
		{"dangling option", []string{"qemu", "-m"}, HostMap{}, `option "-m" has no value`},
	} {
		_, err := DestinationArgs(c.argv, c.m)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want %q", c.name, err, c.want)
		}
	}
}

// TestDestinationArgsOnlyTap: the key "" maps a VM's only tap, whatever
// its name (the spec's destination.tap does not know the source's).
func TestDestinationArgsOnlyTap(t *testing.T) {
	a, err := DestinationArgs([]string{"qemu", "-netdev", "tap,id=n0,ifname=vnet7,script=no"},
		HostMap{Taps: map[string]string{"": "web1"}, QMPSocket: "/q"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(a.Args, "tap,id=n0,ifname=web1,script=no") || !slices.Equal(a.Taps, []string{"vnet7"}) {
		t.Errorf("args %q, taps %v", a.Args, a.Taps)
	}
}

// TestOptsCommas: QEMU's ",," is a comma inside a value, kept through a
// mapping.
func TestOptsCommas(t *testing.T) {
	o := opts("driver=file,filename=/a,,b.raw,node-name=file0")
	if v, _ := o.get("filename"); v != "/a,b.raw" {
		t.Fatalf("filename %q", v)
	}
	if got := o.set("filename", "/c,d.raw").String(); got != "driver=file,filename=/c,,d.raw,node-name=file0" {
		t.Fatalf("set: %q", got)
	}
}

// TestPeerPIDAndCmdline: the process listening on a unix socket is found
// by SO_PEERCRED (here: this test), and its command line read from /proc.
func TestPeerPIDAndCmdline(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pid, err := PeerPID(sock)
	if err != nil || pid != os.Getpid() {
		t.Fatalf("PeerPID = %d, %v; want %d", pid, err, os.Getpid())
	}
	argv, err := Cmdline(pid)
	if err != nil || !slices.Equal(argv, os.Args) {
		t.Fatalf("Cmdline = %q, %v; want %q", argv, err, os.Args)
	}
	if _, err := PeerPID(filepath.Join(t.TempDir(), "absent.sock")); err == nil {
		t.Fatal("no error for an absent socket")
	}
}
