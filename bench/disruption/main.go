// Command disruption measures what a client sees when a VM moves between
// the lab's sites, two ways, side by side in one run:
//
//   - vmhop: live migration (memory, mirrored disk, redirect, DNS flip);
//   - freeze-and-copy: stop the VM, copy its disk over the WAN (only the
//     allocated bytes), boot it at site B on its new address, flip DNS; the
//     client reconnects by name once it notices (1 s without an answer).
//
// In both, a client in the lab sends a request every 10 ms over TCP to the
// guest's echo service while tcpdump captures its interface; disruption is
// the time the capture shows no answer (gaps over 30 ms, less the 10 ms
// interval). Needs root. Writes a text report (bench/results/).
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/miekg/dns"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
	"github.com/vmhop/vmhop/internal/netns"
	"github.com/vmhop/vmhop/internal/units"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/proxy/ddns"
)

var flags struct {
	disk, fill, rate string
	spec, out        string
}

func main() {
	lab.RunChild()
	flag.StringVar(&flags.disk, "disk", "4GiB", "guest disk size")
	flag.StringVar(&flags.fill, "fill", "3GiB", "random data written to the disk before boot")
	flag.StringVar(&flags.rate, "rate", "100mbit", "rate of each site's WAN link")
	flag.StringVar(&flags.spec, "spec", "configs/lab-migration.yaml", "migration spec (limits, DNS)")
	flag.StringVar(&flags.out, "out", "", "also write the report here")
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "disruption:", err)
		os.Exit(1)
	}
}

func run() error {
	disk, err := units.ParseByteSize(flags.disk)
	if err != nil {
		return fmt.Errorf("-disk: %w", err)
	}
	fill, err := units.ParseByteSize(flags.fill)
	if err != nil {
		return fmt.Errorf("-fill: %w", err)
	}
	rate, err := units.ParseBitrate(flags.rate)
	if err != nil {
		return fmt.Errorf("-rate: %w", err)
	}
	spec, err := config.LoadMigration(flags.spec)
	if err != nil {
		return err
	}
	links := lab.DefaultLinks()
	for _, h := range []string{lab.SiteA, lab.SiteB} {
		p := links[h]
		p.Rate = rate
		links[h] = p
	}
	ctx := context.Background()
	vmc := lab.VMConfig{DiskSize: disk, Prefill: fill}
	var rep strings.Builder
	fmt.Fprintf(&rep, "vmhop disruption benchmark, %s\n", time.Now().UTC().Format(time.RFC3339))
	fmt.Fprintf(&rep, "setup: guest 128 MiB RAM (QEMU 7.2 TCG), disk %s with %s of data, disk writer 20 records/s;\n", disk, fill)
	fmt.Fprintf(&rep, "       site links %s and %v one way each (site to site RTT %v); client probe every 10 ms over TCP\n",
		rate, links[lab.SiteA].Delay, 4*links[lab.SiteA].Delay)
	fmt.Fprintf(&rep, "host: %d cores, %s\n\n", runtime.NumCPU(), kernel())

	// 1. vmhop live migration.
	l, err := lab.Up(ctx, lab.Config{Name: "benchlv", Links: links})
	if err != nil {
		return err
	}
	defer l.Down()
	vm, err := l.StartVM(ctx, vmc)
	if err != nil {
		return err
	}
	if err := l.WaitGuest(ctx, vm.IP, 120*time.Second); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	// The same client as freeze-and-copy's below: one echo connection at
	// 100 Hz, nothing else, so the two are measured under the same load.
	out, err := labrun.MigrateUnder(ctx, l, spec, log, &labrun.Load{Conns: 1, HTTPEvery: -1, PingEvery: -1})
	if err != nil {
		return fmt.Errorf("live migration: %w", err)
	}
	fmt.Fprintf(&rep, "== vmhop live migration\n")
	out.Print(&rep)
	_, worst := out.Worst()
	live, liveOut := worst.Disruption.Total, worst.Disruption.Outage
	l.Down()

	// 2. Freeze-and-copy.
	fc, fcOut, err := freezeAndCopy(ctx, links, vmc, spec, &rep)
	if err != nil {
		return fmt.Errorf("freeze-and-copy: %w", err)
	}
	fmt.Fprintf(&rep, "\n== result\n")
	fmt.Fprintf(&rep, "client-visible disruption (gaps over 30 ms): vmhop %s, freeze-and-copy %s: %.0f-fold less with vmhop (reference: 358-fold)\n",
		live.Round(time.Millisecond), fc.Round(time.Millisecond), float64(fc)/float64(live))
	fmt.Fprintf(&rep, "outages (gaps over 100 ms):                vmhop %s, freeze-and-copy %s: %.0f-fold less with vmhop\n",
		liveOut.Round(time.Millisecond), fcOut.Round(time.Millisecond), float64(fcOut)/float64(liveOut))
	fmt.Print(rep.String())
	if flags.out != "" {
		return os.WriteFile(flags.out, []byte(rep.String()), 0o644)
	}
	return nil
}

func kernel() string {
	var u unix.Utsname
	unix.Uname(&u)
	return "Linux " + unix.ByteSliceToString(u.Release[:])
}

func freezeAndCopy(ctx context.Context, links map[string]lab.Profile, vmc lab.VMConfig, spec *config.Migration, rep io.Writer) (time.Duration, time.Duration, error) {
	l, err := lab.Up(ctx, lab.Config{Name: "benchfc", Links: links})
	if err != nil {
		return 0, 0, err
	}
	defer l.Down()
	vm, err := l.StartVM(ctx, vmc)
	if err != nil {
		return 0, 0, err
	}
	if err := l.WaitGuest(ctx, vm.IP, 120*time.Second); err != nil {
		return 0, 0, err
	}
	const port = 7
	capture, err := labrun.StartCapture(l, l.Path("client.pcap"), port)
	if err != nil {
		return 0, 0, err
	}
	probe := &labrun.Probe{L: l, Target: netip.AddrPortFrom(vm.IP, port), Interval: 10 * time.Millisecond, GiveUp: time.Second,
		Resolve: func(ctx context.Context) (netip.Addr, error) {
			r, err := l.QueryDNS(lab.Client, lab.SvcName, dns.TypeA)
			if err != nil || len(r.Answer) == 0 {
				return netip.Addr{}, fmt.Errorf("resolve: %v", err)
			}
			a, _ := netip.AddrFromSlice(r.Answer[0].(*dns.A).A.To4())
			return a, nil
		}}
	pctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan struct{})
	go func() { probe.Run(pctx); close(done) }()
	time.Sleep(2 * time.Second)

	t0 := time.Now()
	// Freeze: stop the guest, then its QEMU (the image is consistent).
	mon, err := dialQMP(ctx, vm.Machine.QMPSocket)
	if err != nil {
		return 0, 0, err
	}
	mon.Execute(ctx, "stop", nil, nil)
	mon.Execute(ctx, "quit", nil, nil)
	mon.Close()
	tStopped := time.Since(t0)
	// Copy: the allocated extents, over the WAN, as a sparse-aware copy would.
	dst, err := l.MachineFor(lab.VMConfig{Host: lab.SiteB})
	if err != nil {
		return 0, 0, err
	}
	n, err := copyOverWAN(ctx, l, vm.Machine.Disk, dst.Disk)
	if err != nil {
		return 0, 0, err
	}
	tCopied := time.Since(t0)
	// Flip DNS, boot at site B on the new address.
	k, _ := ddns.LoadKey(l.KeyFile())
	dc := &ddns.Client{Server: spec.DNS.Server, Key: k, Timeout: spec.DNS.Timeout, Dial: l.Dialer(lab.SiteA)}
	if _, err := dc.Flip(ctx, lab.Zone, lab.SvcName, []netip.Addr{lab.OldIP}, []netip.Addr{lab.NewIP}, spec.DNS.TTL); err != nil {
		return 0, 0, err
	}
	if _, err := l.StartVM(ctx, lab.VMConfig{Host: lab.SiteB, IP: lab.NewIP, Gateway: lab.GatewayB, DiskSize: vmc.DiskSize, ExistingDisk: true}); err != nil {
		return 0, 0, err
	}
	if err := l.WaitGuest(ctx, lab.NewIP, 120*time.Second); err != nil {
		return 0, 0, err
	}
	tBooted := time.Since(t0)
	// Until the client is back.
	for i := 0; i < 600; i++ {
		_, got, _, d := probe.Result()
		if d.Samples > 0 && got > 0 && time.Since(t0) > tBooted && lastReplyAfter(probe, t0.Add(tBooted)) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	stop()
	<-done
	arrivals, total, err := capture.Stop(port)
	if err != nil {
		return 0, 0, err
	}
	d := labrun.Gaps(arrivals, probe.Interval)
	sent, got, reconnects, _ := probe.Result()
	fmt.Fprintf(rep, "\n== freeze-and-copy\n")
	fmt.Fprintf(rep, "stopped after %s; copied %d MiB over the WAN by %s (%.1f Mbit/s); booted at site B, answering by %s\n",
		tStopped.Round(time.Millisecond), n>>20, tCopied.Round(time.Millisecond), float64(n)*8/(tCopied-tStopped).Seconds()/1e6, tBooted.Round(time.Millisecond))
	fmt.Fprintf(rep, "client probe: %d requests, %d answered, %d reconnects\n", sent, got, reconnects)
	fmt.Fprintf(rep, "client-visible disruption (packet capture, %d packets): %s in %d gaps, longest %s\n",
		total, d.Total.Round(time.Millisecond), d.Gaps, d.Longest.Round(time.Millisecond))
	return d.Total, d.Outage, nil
}

func dialQMP(ctx context.Context, path string) (*qemu.Monitor, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return qemu.Dial(ctx, path)
}

func lastReplyAfter(p *labrun.Probe, t time.Time) bool { return p.LastReply().After(t) }

// copyOverWAN sends the data extents of the image at src (site A) to dst
// (site B) through the lab's WAN over TCP, and returns the bytes sent.
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
	go func() {
		c, err := ln.Accept()
		if err != nil {
			recvErr <- err
			return
		}
		defer c.Close()
		f, err := os.Create(dst)
		if err != nil {
			recvErr <- err
			return
		}
		defer f.Close()
		f.Truncate(st.Size())
		hdr := make([]byte, 16)
		buf := make([]byte, 1<<20)
		for {
			if _, err := io.ReadFull(c, hdr); err != nil {
				recvErr <- err
				return
			}
			off, n := int64(binary.BigEndian.Uint64(hdr)), int64(binary.BigEndian.Uint64(hdr[8:]))
			if n == 0 {
				recvErr <- f.Sync()
				return
			}
			for n > 0 {
				k := min(n, int64(len(buf)))
				if _, err := io.ReadFull(c, buf[:k]); err != nil {
					recvErr <- err
					return
				}
				f.WriteAt(buf[:k], off)
				off, n = off+k, n-k
			}
		}
	}()
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
		c.Write(hdr)
		for p := data; p < hole; {
			k := min(hole-p, int64(len(buf)))
			f.ReadAt(buf[:k], p)
			if _, err := c.Write(buf[:k]); err != nil {
				return sent, err
			}
			p += k
			sent += k
		}
		off = hole
	}
	c.Write(make([]byte, 16))
	return sent, <-recvErr
}
