package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AgentConfig configures the agent; the guest's /init passes it on the kernel
// command line as vmhop.KEY=VALUE.
type AgentConfig struct {
	Disk      string  // block device for the record log ("" disables the writer)
	Rate      float64 // records per second
	Log       Log     // where on Disk the records go
	HTTPAddr  string  // status page
	EchoAddr  string  // TCP and UDP echo
	TickEvery time.Duration
	// The RAM verifier (MemCheck): a working set of MemMiB (0 disables it)
	// whose first MemHot pages are checked and rewritten every 10 ms, the
	// others rewritten at MemWrites pages/s; every page is checked every
	// MemCycle.
	MemMiB    int
	MemHot    int
	MemWrites int
	MemCycle  time.Duration
}

// DefaultAgentConfig: 20 records/s into the first 16 MiB of /dev/vda.
func DefaultAgentConfig() AgentConfig {
	return AgentConfig{
		Disk: "/dev/vda", Rate: 20, Log: Log{Offset: 0, Slots: 16 << 20 / RecordSize},
		HTTPAddr: ":80", EchoAddr: ":7", TickEvery: 100 * time.Millisecond,
		// 32 MiB checked every 2 s; 64 hot pages (256 KiB) at 100 Hz and
		// 512 cold pages/s: 2 MiB/s of new dirty pages, so pre-copy
		// converges at the lab's 90 Mbit/s.
		MemMiB: 32, MemHot: 64, MemWrites: 512, MemCycle: 2 * time.Second,
	}
}

// ParseCmdline applies vmhop.disk, vmhop.rate, vmhop.logmb, vmhop.memmb,
// vmhop.memhot and vmhop.memwps from a kernel command line.
func (c *AgentConfig) ParseCmdline(cmdline string) error {
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(k, "vmhop.") {
			continue
		}
		switch k {
		case "vmhop.disk":
			c.Disk = v
		case "vmhop.rate":
			r, err := strconv.ParseFloat(v, 64)
			if err != nil || r < 0 {
				return fmt.Errorf("vmhop.rate=%q: not a rate", v)
			}
			c.Rate = r
		case "vmhop.logmb":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil || n == 0 {
				return fmt.Errorf("vmhop.logmb=%q: not a size in MiB", v)
			}
			c.Log.Slots = n << 20 / RecordSize
		case "vmhop.memmb", "vmhop.memhot", "vmhop.memwps":
			n, err := strconv.ParseUint(v, 10, 16)
			if err != nil {
				return fmt.Errorf("%s=%q: not a count", k, v)
			}
			switch k {
			case "vmhop.memmb":
				c.MemMiB = int(n)
			case "vmhop.memhot":
				c.MemHot = int(n)
			default:
				c.MemWrites = int(n)
			}
		}
	}
	return nil
}

// Status is what GET /status returns.
type Status struct {
	BootID     string  `json:"boot_id"`
	Uptime     float64 `json:"uptime_s"` // guest clock: drifts under TCG, do not time with it
	Counter    uint64  `json:"counter"`  // ticks since boot
	Requests   uint64  `json:"requests"`
	DiskAcked  uint64  `json:"disk_acked"` // highest record seq written with O_DSYNC
	DiskErrors uint64  `json:"disk_errors"`
	DirtyMiB   int     `json:"dirty_mib"`
	DirtyRate  float64 `json:"dirty_mibps"`
	// EchoConns is the TCP echo connections open now; MemAvailableMiB the
	// guest kernel's MemAvailable (/proc/meminfo), what it can still give
	// without swapping (the lab guest has no swap: at 0 it panics). A
	// load of many connections shows what it costs the guest here.
	EchoConns       int64   `json:"echo_conns"`
	MemAvailableMiB float64 `json:"mem_available_mib"`
	// Mem is the RAM verifier's count: Lost > 0 means a migration lost a
	// guest memory write (nil when the verifier is off).
	Mem *MemStats `json:"mem,omitempty"`
}

// Agent is the guest's workload.
type Agent struct {
	cfg               AgentConfig
	boot              BootID
	start             time.Time
	counter, requests atomic.Uint64
	echoConns         atomic.Int64
	acked, diskErrors atomic.Uint64
	dirtyMu           sync.Mutex
	dirtyStop         context.CancelFunc
	dirtyMiB          int
	dirtyRate         float64
	memMu             sync.Mutex
	mem               *MemCheck
	memReported       uint64 // losses already written to the console
}

// NewAgent reads the boot id and returns an agent ready to Run.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return nil, err
	}
	boot, err := ParseBootID(string(b))
	if err != nil {
		return nil, err
	}
	return &Agent{cfg: cfg, boot: boot, start: time.Now()}, nil
}

// Run serves until ctx ends or a listener fails.
func (a *Agent) Run(ctx context.Context) error {
	errc := make(chan error, 4)
	go func() { errc <- a.tick(ctx) }()
	go func() { errc <- a.serveEchoTCP(ctx) }()
	go func() { errc <- a.serveEchoUDP(ctx) }()
	go func() { errc <- a.serveHTTP(ctx) }()
	if a.cfg.Disk != "" && a.cfg.Rate > 0 {
		go func() { errc <- a.writeRecords(ctx) }()
	}
	if a.cfg.MemMiB > 0 {
		if err := a.startMemCheck(ctx); err != nil {
			return err
		}
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}

func (a *Agent) tick(ctx context.Context) error {
	t := time.NewTicker(a.cfg.TickEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			a.counter.Add(1)
		}
	}
}

func (a *Agent) serveEchoTCP(ctx context.Context) error {
	ln, err := net.Listen("tcp", a.cfg.EchoAddr)
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return ctx.Err()
			}
			// Out of descriptors or memory for a moment: the agent is the
			// guest's init, and its end is a kernel panic (and the VM's
			// end: QEMU runs with -no-reboot). Wait and accept again.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			fmt.Fprintf(os.Stderr, "vmhop-guest: echo: accept: %v; again in %s\n", err, backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		a.echoConns.Add(1)
		go func() {
			defer a.echoConns.Add(-1)
			defer c.Close()
			echo(c)
		}()
	}
}

// echoBuf is an echo connection's buffer: the load's lines are a few
// bytes; what a bigger write brings comes back in several.
const echoBuf = 2 << 10

// echo sends back what c sends until it closes, through a small buffer of
// its own. (io.Copy(c, c) splices through a pipe per connection, held
// while it waits: its ring sized for 1 MiB and two more descriptors; at
// 1000 connections the 128 MiB lab guest ran out of memory and its
// kernel panicked: bench/results/2026-11-30-scaling, echo_conns=1000.)
func echo(c net.Conn) {
	buf := make([]byte, echoBuf)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// memAvailableMiB is /proc/meminfo's MemAvailable in MiB (-1 if unread).
func memAvailableMiB() float64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	return parseMemAvailable(string(b))
}

// parseMemAvailable reads MemAvailable (kB) from meminfo's text, in MiB;
// -1 if it is not there.
func parseMemAvailable(meminfo string) float64 {
	for _, line := range strings.Split(meminfo, "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return -1
			}
			return kb / 1024
		}
	}
	return -1
}

func (a *Agent) serveEchoUDP(ctx context.Context) error {
	pc, err := net.ListenPacket("udp", a.cfg.EchoAddr)
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, func() { pc.Close() })
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return ctx.Err()
		}
		pc.WriteTo(buf[:n], from)
	}
}

func (a *Agent) status() Status {
	a.dirtyMu.Lock()
	defer a.dirtyMu.Unlock()
	s := Status{
		BootID: a.boot.String(), Uptime: time.Since(a.start).Seconds(),
		Counter: a.counter.Load(), Requests: a.requests.Load(),
		DiskAcked: a.acked.Load(), DiskErrors: a.diskErrors.Load(),
		DirtyMiB: a.dirtyMiB, DirtyRate: a.dirtyRate,
		EchoConns: a.echoConns.Load(), MemAvailableMiB: memAvailableMiB(),
	}
	a.memMu.Lock()
	if a.mem != nil {
		ms := a.mem.Stats()
		s.Mem = &ms
	}
	a.memMu.Unlock()
	return s
}

// startMemCheck maps the verifier's working set outside the Go heap (so the
// runtime never moves or frees it) and runs it every 10 ms.
func (a *Agent) startMemCheck(ctx context.Context) error {
	mem, err := unix.Mmap(-1, 0, a.cfg.MemMiB<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("memcheck: map %d MiB: %w", a.cfg.MemMiB, err)
	}
	m, err := NewMemCheck(mem, a.cfg.MemHot)
	if err != nil {
		return err
	}
	a.mem = m
	const every = 10 * time.Millisecond
	pages := len(mem) / PageSize
	checks := max(1, pages*int(every/time.Millisecond)/int(a.cfg.MemCycle/time.Millisecond))
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		// Cold writes per tick carry a remainder so the rate is exact.
		acc := 0
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			acc += a.cfg.MemWrites
			a.memMu.Lock()
			m.Step(acc/100, checks)
			before := m.nlost + m.corrupt
			a.memMu.Unlock()
			acc %= 100
			if before > 0 && before != a.memReported {
				a.memReported = before
				fmt.Fprintf(os.Stderr, "vmhop-guest: memcheck: %d lost or corrupt pages: %+v\n", before, m.Stats().First)
			}
		}
	}()
	return nil
}

func (a *Agent) serveHTTP(ctx context.Context) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		a.requests.Add(1)
		s := a.status()
		fmt.Fprintf(w, "vmhop-guest boot_id=%s uptime=%.1f counter=%d requests=%d disk_acked=%d\n",
			s.BootID, s.Uptime, s.Counter, s.Requests, s.DiskAcked)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		a.requests.Add(1)
		json.NewEncoder(w).Encode(a.status())
	})
	// /verify?acked=N reads the log back from the disk, bypassing the page
	// cache, and reports whether every record up to N is there.
	mux.HandleFunc("GET /verify", func(w http.ResponseWriter, r *http.Request) {
		acked, err := strconv.ParseUint(r.URL.Query().Get("acked"), 10, 64)
		if err != nil {
			http.Error(w, "acked: want a record sequence number", http.StatusBadRequest)
			return
		}
		rep, err := a.verify(acked)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		json.NewEncoder(w).Encode(rep)
	})
	// /download?rate=R&bytes=N streams a bulk download (Download).
	mux.HandleFunc("GET /download", Download)
	// /dirty?mib=N&mibps=R keeps rewriting an N MiB buffer at R MiB/s, so
	// pre-copy has work to do; mibps=0 stops.
	mux.HandleFunc("POST /dirty", func(w http.ResponseWriter, r *http.Request) {
		mib, err1 := strconv.Atoi(r.URL.Query().Get("mib"))
		rate, err2 := strconv.ParseFloat(r.URL.Query().Get("mibps"), 64)
		if err1 != nil || err2 != nil || mib < 0 || mib > 1024 || rate < 0 {
			http.Error(w, "want mib=0..1024 and mibps>=0", http.StatusBadRequest)
			return
		}
		a.setDirty(mib, rate)
		json.NewEncoder(w).Encode(a.status())
	})
	// /memcheck/inject?page=N makes a lost update on purpose (MemCheck.InjectLoss).
	mux.HandleFunc("POST /memcheck/inject", func(w http.ResponseWriter, r *http.Request) {
		page, err := strconv.Atoi(r.URL.Query().Get("page"))
		if err != nil {
			http.Error(w, "page: want a page number", http.StatusBadRequest)
			return
		}
		a.memMu.Lock()
		if a.mem == nil {
			err = errors.New("memcheck: off (vmhop.memmb=0)")
		} else {
			err = a.mem.InjectLoss(page)
		}
		a.memMu.Unlock()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		json.NewEncoder(w).Encode(a.status())
	})
	srv := &http.Server{Addr: a.cfg.HTTPAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	context.AfterFunc(ctx, func() { srv.Close() })
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func (a *Agent) setDirty(mib int, rate float64) {
	a.dirtyMu.Lock()
	defer a.dirtyMu.Unlock()
	if a.dirtyStop != nil {
		a.dirtyStop()
		a.dirtyStop = nil
	}
	a.dirtyMiB, a.dirtyRate = 0, 0
	if mib == 0 || rate == 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	a.dirtyStop, a.dirtyMiB, a.dirtyRate = cancel, mib, rate
	buf := make([]byte, mib<<20)
	const page = 4096
	// Fault every page in now: pages first touched during a migration change
	// the guest's page tables, which QEMU 7.2 TCG does not always track (see
	// docs/architecture.md); the workload is "rewrite resident memory".
	for i := 0; i < len(buf); i += page {
		buf[i] = 1
	}
	go func() {
		pagesPerTick := int(rate * (1 << 20) / page / 100) // 100 ticks a second
		if pagesPerTick < 1 {
			pagesPerTick = 1
		}
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		p, v := 0, byte(0)
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			v++
			for range pagesPerTick {
				buf[p*page] = v
				p = (p + 1) % (len(buf) / page)
			}
		}
	}()
}

// alignedBlock returns a RecordSize buffer aligned for O_DIRECT.
func alignedBlock() []byte {
	b := make([]byte, 2*RecordSize)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (RecordSize - 1))
	if off != 0 {
		off = RecordSize - off
	}
	return b[off : off+RecordSize]
}

// writeRecords appends records at cfg.Rate; a record counts as acknowledged
// once its O_DIRECT|O_DSYNC write returned: QEMU has then put it in the image.
func (a *Agent) writeRecords(ctx context.Context) error {
	f, err := os.OpenFile(a.cfg.Disk, os.O_RDWR|unix.O_DIRECT|unix.O_DSYNC, 0)
	if err != nil {
		return fmt.Errorf("open disk: %w", err)
	}
	defer f.Close()
	buf := alignedBlock()
	t := time.NewTicker(time.Duration(float64(time.Second) / a.cfg.Rate))
	defer t.Stop()
	for seq := uint64(1); ; seq++ {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		Record{Seq: seq, Boot: a.boot, Time: time.Now().UnixNano()}.MarshalTo(buf)
		for {
			if _, err := f.WriteAt(buf, a.cfg.Log.At(seq)); err == nil {
				break
			}
			// Not acknowledged: retry the same seq so the log stays gapless.
			a.diskErrors.Add(1)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(100 * time.Millisecond):
			}
		}
		a.acked.Store(seq)
	}
}

type directReader struct {
	f   *os.File
	buf []byte
}

func (d directReader) ReadAt(p []byte, off int64) (int, error) {
	if len(p) != RecordSize || off%RecordSize != 0 {
		return 0, errors.New("direct read: want whole aligned records")
	}
	n, err := d.f.ReadAt(d.buf, off)
	copy(p, d.buf[:n])
	return n, err
}

func (a *Agent) verify(acked uint64) (Report, error) {
	f, err := os.OpenFile(a.cfg.Disk, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return Report{}, err
	}
	defer f.Close()
	return a.cfg.Log.Verify(directReader{f, alignedBlock()}, a.boot, acked)
}
