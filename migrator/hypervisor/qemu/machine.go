package qemu

import (
	"fmt"
	"strconv"
)

// Machine is a QEMU VM definition. A migration destination must be started
// from the same definition as the source (same devices, same memory), with
// Incoming set; Args renders both.
type Machine struct {
	Name       string // -name, for ps and logs
	MemKiB     int    // guest RAM in KiB (-m ...k); QEMU rounds it up to 8 KiB; the lab guest needs at least 96 MiB
	CPUs       int
	Accel      string // "tcg" (default) or "kvm"
	Kernel     string // direct kernel boot (the lab guest); empty to boot from disk
	Initrd     string
	Append     string // kernel command line
	Disk       string // disk image path
	DiskFormat string // "raw" or "qcow2"
	Tap        string // existing tap interface for the NIC
	MAC        string
	QMPSocket  string // unix socket path, server side
	Console    string // serial output file
	PidFile    string
	// Incoming makes a migration destination: "defer" waits for
	// migrate-incoming over QMP (so capabilities can be set first).
	Incoming string
}

// Args returns the qemu-system-x86_64 arguments for m.
func (m Machine) Args() ([]string, error) {
	if m.MemKiB < 16<<10 || m.QMPSocket == "" || m.Disk == "" {
		return nil, fmt.Errorf("qemu machine %q: want at least 16 MiB of RAM, a QMP socket and a disk", m.Name)
	}
	accel := m.Accel
	if accel == "" {
		accel = "tcg"
	}
	cpus := m.CPUs
	if cpus == 0 {
		cpus = 1
	}
	format := m.DiskFormat
	if format == "" {
		format = "raw"
	}
	a := []string{
		"-name", m.Name,
		"-machine", "pc,accel=" + accel,
		"-m", strconv.Itoa(m.MemKiB) + "k",
		"-smp", strconv.Itoa(cpus),
		"-nodefaults", "-no-user-config", "-display", "none",
		"-qmp", "unix:" + m.QMPSocket + ",server=on,wait=off",
		// The disk's node name is stable so block jobs can name it.
		"-blockdev", fmt.Sprintf("driver=file,filename=%s,node-name=file0,cache.direct=off,discard=unmap", m.Disk),
		// Zeros written to the disk (a mirror copying holes) become holes
		// again, so images stay sparse and digests skip them.
		"-blockdev", fmt.Sprintf("driver=%s,file=file0,node-name=disk0,discard=unmap,detect-zeroes=unmap", format),
		// The disk runs in its own I/O thread: its block jobs (the mirror
		// and its NBD connection) then stay off the main loop, which also
		// moves the guest's network packets.
		"-object", "iothread,id=iot0",
		"-device", "virtio-blk-pci,drive=disk0,id=vblk0,iothread=iot0",
	}
	if m.Kernel != "" {
		a = append(a, "-kernel", m.Kernel, "-initrd", m.Initrd, "-append", m.Append)
	}
	if m.Tap != "" {
		a = append(a,
			"-netdev", "tap,id=net0,ifname="+m.Tap+",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=net0,id=nic0,romfile=,mac="+m.MAC)
	}
	if m.Console != "" {
		a = append(a, "-serial", "file:"+m.Console)
	}
	if m.PidFile != "" {
		a = append(a, "-pidfile", m.PidFile)
	}
	a = append(a, "-no-reboot")
	if m.Incoming != "" {
		a = append(a, "-incoming", m.Incoming)
	}
	return a, nil
}
