package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/proxy/ddns"
)

// freezeAndCopy moves the lab's guest the old way under the same load as
// the live modes: stop it, copy its disk's data over the WAN, boot it at
// site B on the new address, flip DNS; the clients give up on silence and
// reconnect by name. It returns the run and the pcap's path (in the lab).
func freezeAndCopy(ctx context.Context, l *lab.Lab, vm *lab.VM, spec *config.Migration, sc *scenario) (runData, string, error) {
	var d runData
	lr, err := startLoad(ctx, l, vm, spec, sc)
	if err != nil {
		return d, "", err
	}
	defer lr.End()
	pcap, load := lr.Pcap, lr.Load

	t0 := time.Now()
	d.Start, d.Stopped = t0, t0
	// Freeze: stop the guest, then its QEMU (the image is consistent).
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	mon, err := qemu.Dial(qctx, vm.Machine.QMPSocket)
	cancel()
	if err != nil {
		return d, pcap, err
	}
	mon.Execute(ctx, "stop", nil, nil)
	mon.Execute(ctx, "quit", nil, nil)
	mon.Close()
	tStopped := time.Now()
	dst, err := l.MachineFor(lab.VMConfig{Host: lab.SiteB})
	if err != nil {
		return d, pcap, err
	}
	n, err := copyOverWAN(ctx, l, vm.Machine.Disk, dst.Disk)
	if err != nil {
		return d, pcap, fmt.Errorf("copy: %w", err)
	}
	d.MigrationWire = n
	tCopied := time.Now()
	if _, err := l.StartVM(ctx, lab.VMConfig{Host: lab.SiteB, IP: lab.NewIP, Gateway: lab.GatewayB, MemMiB: sc.RAMMiB, MemCheckMiB: sc.MemCheckMiB,
		DiskSize: sc.Disk, ExistingDisk: true}); err != nil {
		return d, pcap, fmt.Errorf("boot at site B: %w", err)
	}
	if err := l.WaitGuest(ctx, lab.NewIP, 180*time.Second); err != nil {
		return d, pcap, fmt.Errorf("boot at site B: %w", err)
	}
	tBooted := time.Now()
	d.Resumed = tBooted
	k, err := ddns.LoadKey(l.KeyFile())
	if err != nil {
		return d, pcap, err
	}
	dc := &ddns.Client{Server: spec.DNS.Server, Key: k, Timeout: spec.DNS.Timeout, Dial: l.Dialer(lab.SiteA)}
	if _, err := dc.Flip(ctx, spec.DNS.Zone, spec.DNS.Name, []netip.Addr{spec.Network.OldIP}, []netip.Addr{spec.Network.NewIP}, spec.DNS.TTL); err != nil {
		return d, pcap, fmt.Errorf("dns flip: %w", err)
	}
	tFlipped := time.Now()
	// Until every echo client is back (it gives up on the old address,
	// resolves the name again and reconnects), at most a minute.
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		back := true
		for _, p := range load.Echo {
			back = back && p.LastReply().After(tFlipped)
		}
		if back {
			break
		}
	}
	tBack := time.Now()
	time.Sleep(3 * time.Second) // the clients keep talking to the moved VM
	var cerr error
	d.View, cerr = lr.End()
	d.Pause = tBooted.Sub(t0)
	d.Total = tFlipped.Sub(t0)
	d.Phases = []labrun.Span{{Name: "freeze", From: t0, To: tStopped}, {Name: "copy", From: tStopped, To: tCopied},
		{Name: "boot at B", From: tCopied, To: tBooted}, {Name: "dns-flip", From: tBooted, To: tFlipped},
		{Name: "clients back", From: tFlipped, To: tBack}}
	return d, pcap, cerr
}

// copyOverWAN sends the data extents of the image at src (site A) to dst
// (site B) through the lab's WAN over TCP, as a sparse-aware copy would,
// and returns the bytes sent.
func copyOverWAN(ctx context.Context, l *lab.Lab, src, dst string) (int64, error) {
	ln, err := netns.Listen(l.NS(lab.SiteB), "tcp", lab.HostB.String()+":9911")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	st, err := os.Stat(src)
	if err != nil {
		return 0, err
	}
	recvErr := make(chan error, 1)
	go func() { recvErr <- receive(ln, dst, st.Size()) }()
	c, err := l.DialTCP(ctx, lab.SiteA, netip.AddrPortFrom(lab.HostB, 9911))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	f, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var sent int64
	buf := make([]byte, 1<<20)
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			break // no data after off
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return sent, err
		}
		hdr := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, uint64(data)), uint64(hole-data))
		if _, err := c.Write(hdr); err != nil {
			return sent, err
		}
		for p := data; p < hole; {
			k := min(hole-p, int64(len(buf)))
			if _, err := f.ReadAt(buf[:k], p); err != nil {
				return sent, err
			}
			if _, err := c.Write(buf[:k]); err != nil {
				return sent, err
			}
			p += k
			sent += k
		}
		off = hole
	}
	if _, err := c.Write(make([]byte, 16)); err != nil {
		return sent, err
	}
	return sent, <-recvErr
}

// receive writes what copyOverWAN sends into a sparse image of size at dst.
func receive(ln net.Listener, dst string, size int64) error {
	c, err := ln.Accept()
	if err != nil {
		return err
	}
	defer c.Close()
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return err
	}
	hdr := make([]byte, 16)
	buf := make([]byte, 1<<20)
	for {
		if _, err := io.ReadFull(c, hdr); err != nil {
			return err
		}
		off, n := int64(binary.BigEndian.Uint64(hdr)), int64(binary.BigEndian.Uint64(hdr[8:]))
		if n == 0 {
			return f.Sync()
		}
		for n > 0 {
			k := min(n, int64(len(buf)))
			if _, err := io.ReadFull(c, buf[:k]); err != nil {
				return err
			}
			if _, err := f.WriteAt(buf[:k], off); err != nil {
				return err
			}
			off, n = off+k, n-k
		}
	}
}
