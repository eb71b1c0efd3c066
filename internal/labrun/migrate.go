package labrun

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/guest"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
)

// Outcome is a lab migration with what the client saw and what the guest
// says of itself afterwards.
type Outcome struct {
	Report    migrator.Report
	Client    ClientView // the load's view; echo gaps from the packet capture
	Captured  int        // packets in the capture
	Guest     GuestCheck
	Preflight migrator.Preflight // what migrator.Check found before the move
	Drained   time.Duration
	Start     time.Time // when the migration started
	// Pcap is the client's packet capture (in the lab's directory: copy it
	// before the lab goes down).
	Pcap string `json:",omitempty"`
	// EchoUp of EchoConns echo connections had an answer when the move
	// started (the load's connections open over time: Load.WaitEcho).
	EchoUp, EchoConns int
	// Source is the source VM after a move that failed before the VM
	// moved: whether it stayed safe at site A (nil otherwise).
	Source *SourceState `json:",omitempty"`
	// Err is the migration's error, if any, with its exit code.
	Err  string `json:",omitempty"`
	Exit int
}

// GuestCheck is the guest's own account after the move: it is the same
// boot, it kept running, and its RAM and disk verifiers found nothing lost.
type GuestCheck struct {
	Answered   bool   // the guest answered its status page at the new address
	SameBoot   bool   // boot id unchanged: no reboot, no new guest
	MemCycles  uint64 // full checks of the RAM working set since the move
	MemLost    uint64 // pages that went back in time (lost guest writes)
	MemCorrupt uint64
	Disk       guest.Report // every acknowledged disk record, read back at the destination
	Problem    string       `json:",omitempty"` // what is wrong, if anything
}

// OK says whether the guest survived the move intact.
func (g GuestCheck) OK() bool { return g.Problem == "" }

// span is a phase's place in time.
type span struct {
	name     string
	from, to time.Time
}

// Span is a phase's place in time (wall clock).
type Span struct {
	Name     string
	From, To time.Time
}

// Spans places the migration's phases in time; dns-prepare runs beside
// the disk phases.
func (o Outcome) Spans() []Span {
	var out []Span
	for _, s := range o.spans() {
		out = append(out, Span{s.name, s.from, s.to})
	}
	return out
}

// spans places the phases in time. Phases run one after the other, except
// dns-prepare, which starts after datapath beside the disk phases; memory
// waits for both.
func (o Outcome) spans() []span {
	at, dnsEnd := o.Start, o.Start
	for _, ph := range o.Report.Phases {
		if ph.Name == "datapath" {
			dnsEnd = at.Add(ph.Duration)
		}
	}
	var out []span
	for _, ph := range o.Report.Phases {
		if ph.Name == "dns-prepare" {
			out = append(out, span{ph.Name, dnsEnd, dnsEnd.Add(ph.Duration)})
			dnsEnd = dnsEnd.Add(ph.Duration)
		}
	}
	for _, ph := range o.Report.Phases {
		if ph.Name == "dns-prepare" {
			continue
		}
		if ph.Name == "memory" {
			at = later(at, dnsEnd)
		}
		out = append(out, span{ph.Name, at, at.Add(ph.Duration)})
		at = at.Add(ph.Duration)
	}
	return out
}

// phaseAt names the phase running at t (dns-prepare where it runs beside
// the disk phases only once they are done).
func (o Outcome) phaseAt(t time.Time) string {
	var dns string
	for _, s := range o.spans() {
		if t.Before(s.from) || !t.Before(s.to) {
			continue
		}
		if s.name == "dns-prepare" {
			dns = s.name
			continue
		}
		return s.name
	}
	if dns != "" {
		return dns
	}
	return "after the migration"
}

// SwitchGap is the longest gap any echo connection saw across the
// switchover: the pause (which ends with the memory phase) and the
// destination's warm-up after it. 0 if no gap over the threshold covers it.
func (o Outcome) SwitchGap() time.Duration {
	var resumed time.Time
	for _, s := range o.spans() {
		if s.name == "memory" {
			resumed = s.to
		}
	}
	if resumed.IsZero() {
		return 0
	}
	from := resumed.Add(-o.Report.Pause - 50*time.Millisecond)
	var longest time.Duration
	for _, e := range o.Client.Echo {
		for _, g := range e.Disruption.Worst {
			if g.Start.Before(resumed) && g.Start.Add(g.Length).After(from) {
				longest = max(longest, g.Length)
			}
		}
	}
	return longest
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// Migrate moves the lab's guest from site A to B under spec, through the
// sites' vmhopd daemons (started if they do not run: Lab.StartDaemons),
// while a client load runs against it (see Load) and tcpdump captures the
// client's interface; then it asks the guest whether it survived intact
// (CheckGuest) while site A's vmhopd drains the redirect. The error is
// the migration's (its exit code kept: migrator.ExitCode), or the guest
// check's (the guest did not survive: an aborted exit).
func Migrate(ctx context.Context, l *lab.Lab, spec *config.Migration, log *slog.Logger) (Outcome, error) {
	return MigrateUnder(ctx, l, spec, log, &Load{})
}

// SpecFor is spec as it applies to l's guest vm moving from site A to
// site B as machine dm: the VM's name, QMP socket and disk, the sites'
// daemons and addresses, the destination's disk, tap and QMP socket are
// the lab's; the TSIG key file is the lab's when spec's does not exist.
func SpecFor(l *lab.Lab, vm *lab.VM, dm qemu.Machine, spec *config.Migration) *config.Migration {
	s := *spec
	s.VM.Name, s.VM.QMPSocket, s.VM.Disk = vm.Name, vm.Machine.QMPSocket, vm.Machine.Disk
	s.Source.Daemon, s.Source.Address = DaemonAddr(lab.SiteA), lab.HostA
	s.Destination.Daemon, s.Destination.Address = DaemonAddr(lab.SiteB), lab.HostB
	s.Destination.Disk, s.Destination.Tap, s.Destination.QMPSocket = dm.Disk, dm.Tap, dm.QMPSocket
	if _, err := os.Stat(s.DNS.TSIGKeyFile); err != nil {
		s.DNS.TSIGKeyFile = l.KeyFile()
	}
	return &s
}

// MigrateUnder is Migrate with the client load shaped by shape (its
// Conns, EchoEvery, HTTPEvery, PingEvery; zero values are the defaults,
// negative ones turn that part off). A benchmark compares vmhop with
// another way of moving under the same load this way.
func MigrateUnder(ctx context.Context, l *lab.Lab, spec *config.Migration, log *slog.Logger, shape *Load) (Outcome, error) {
	return MigrateWith(ctx, l, spec, log, shape, Options{})
}

// Redirect is how packets for the old address reach the moved VM.
type Redirect string

const (
	// RedirectEBPF is vmhop's eBPF/TC redirect (the default): both
	// vmhopd with datapath ebpf.
	RedirectEBPF Redirect = "ebpf"
	// RedirectNone leaves the redirect off: the spec's network.redirect
	// false (live migration with the DNS flip only), daemons as for eBPF.
	RedirectNone Redirect = "none"
	// RedirectUserspace is the packet-level userspace fallback: both
	// vmhopd with datapath userspace (a WireGuard tunnel, no BPF).
	RedirectUserspace Redirect = "userspace"
)

// Options are a benchmark's changes to a lab migration.
type Options struct {
	// Redirect is how the old address reaches the moved VM; "" takes the
	// running daemons' datapath (ebpf if they have to be started).
	Redirect Redirect
	// Capture is the client capture's tcpdump filter; "" captures the echo
	// port only ("tcp port 7"). The echo analysis follows port 7 whatever
	// else is captured.
	Capture string
}

// MigrateWith is MigrateUnder with a benchmark's changes (opt), through
// the sites' vmhopd daemons as Migrate: it starts them with the datapath
// opt.Redirect needs if they do not run (ebpf when it names none: "" or
// RedirectNone); daemons already running with another datapath than
// RedirectEBPF or RedirectUserspace name are an error. Out.Pcap is the
// client capture; out.Start is when site A's vmhopd started the
// migration's first phase (its event's time: the phases' durations
// count from there). An unknown option fails before the lab is touched.
func MigrateWith(ctx context.Context, l *lab.Lab, spec *config.Migration, log *slog.Logger, shape *Load, opt Options) (Outcome, error) {
	var out Outcome
	datapath := "" // any: the running daemons' (ebpf if they have to be started)
	switch opt.Redirect {
	case "":
	case RedirectEBPF:
		datapath = "ebpf"
	case RedirectNone:
		s := *spec
		s.Network.Redirect = false
		spec = &s
	case RedirectUserspace:
		datapath = "userspace"
	default:
		return out, fmt.Errorf("redirect %q: want %q, %q or %q", opt.Redirect, RedirectEBPF, RedirectNone, RedirectUserspace)
	}
	filter := opt.Capture
	if filter == "" {
		filter = fmt.Sprintf("tcp port %d", EchoPort)
	}
	vm, before, err := sourceGuest(ctx, l)
	if err != nil {
		return out, err
	}
	if !DaemonsRunning(ctx, l) {
		if err := StartDaemons(ctx, l, Continuity(cmp.Or(datapath, "ebpf"))); err != nil {
			return out, fmt.Errorf("lab %s: start vmhopd on both sites: %w", l.Name, err)
		}
	} else if running := daemonsDatapath(l); datapath != "" && running != datapath {
		return out, fmt.Errorf("lab %s: its vmhopd run with datapath %q; redirect %q needs %q (stop them first)", l.Name, running, opt.Redirect, datapath)
	}
	dm, err := l.MachineFor(lab.VMConfig{Name: vm.Name, Host: lab.SiteB, IP: vm.IP})
	if err != nil {
		return out, err
	}
	specYAML, err := config.MarshalMigration(SpecFor(l, vm, dm, spec))
	if err != nil {
		return out, err
	}
	out.Pcap = l.Path("client.pcap")
	capture, err := StartCaptureFilter(l, out.Pcap, filter)
	if err != nil {
		return out, err
	}
	load := &Load{L: l, Addr: vm.IP, Name: spec.DNS.Name, DNS: netip.MustParseAddrPort(spec.DNS.Server),
		Conns: shape.Conns, EchoEvery: shape.EchoEvery, HTTPEvery: shape.HTTPEvery, PingEvery: shape.PingEvery,
		GiveUp: shape.GiveUp, BulkRate: shape.BulkRate}
	load.defaults() // before Run: WaitEcho reads them
	lctx, stop := context.WithCancel(ctx)
	loadDone := make(chan struct{})
	go func() { load.Run(lctx); close(loadDone) }()
	time.Sleep(time.Second)
	// Many echo connections open over time (EchoOpenRate): the move
	// starts once every one has had an answer, or 15 s after they all
	// should have.
	out.EchoUp, out.EchoConns = load.WaitEcho(ctx, 15*time.Second)
	if out.EchoUp < out.EchoConns {
		log.Warn("the move starts with echo connections not up", "up", out.EchoUp, "of", out.EchoConns)
	}

	// The operator's part: hand the spec to site A's vmhopd and follow it.
	out.Start = time.Now()
	lc := daemon.NewLocalClient(DaemonSocket(l, lab.SiteA))
	id, err := lc.Migrate(ctx, specYAML)
	moved := make(chan daemon.JobReport, 1)
	firstPhase := make(chan time.Time, 1)
	type followed struct {
		res *daemon.Result
		err error
	}
	ended := make(chan followed, 1)
	if err == nil {
		log.Info("vmhopd at site A runs the migration", "id", id)
		go func() {
			res, err := lc.Follow(ctx, id, func(ev daemon.Event) error {
				log.Info("vmhopd: "+ev.Message, "phase", ev.Phase)
				if ev.Phase != "" && !ev.Time.IsZero() {
					select {
					case firstPhase <- ev.Time:
					default:
					}
				}
				var jr daemon.JobReport
				if ev.Phase == daemon.PhaseDrain && json.Unmarshal(ev.Data, &jr) == nil {
					moved <- jr
				}
				return nil
			})
			ended <- followed{res, err}
		}()
	} else {
		ended <- followed{nil, err}
	}
	var fin *followed
	var jr daemon.JobReport
	select {
	case jr = <-moved:
	case f := <-ended:
		fin = &f
	}
	movedOn := fin == nil       // the VM runs at site B now (drain began)
	time.Sleep(3 * time.Second) // the clients keep talking to the moved VM
	stop()
	<-loadDone
	byPort, total, cerr := capture.StopByPort(EchoPort)
	out.Captured = total
	out.Client = load.View(byPort)
	if fin == nil {
		// Moved: the guest's account while site A's vmhopd drains.
		out.Guest = CheckGuest(ctx, l, lab.NewIP, before)
		l.MoveVM(vm.Machine.Name, dm, lab.SiteB)
		f := <-ended
		fin = &f
	}
	select {
	case t := <-firstPhase:
		out.Start = t
	default:
	}
	err = fin.err
	if err == nil {
		err = resultErr(fin.res)
		if len(fin.res.Report) > 0 {
			json.Unmarshal(fin.res.Report, &jr)
		}
	}
	out.Report, out.Preflight, out.Drained = jr.Migration, jr.Preflight, time.Duration(jr.DrainedMS)*time.Millisecond
	if err == nil && cerr != nil {
		err = cerr
	}
	if errors.Is(err, migrator.ErrUnhealthy) {
		out.Guest = CheckGuest(ctx, l, lab.NewIP, before)
	}
	if err == nil && !out.Guest.OK() {
		err = fmt.Errorf("the guest did not survive the move: %s", out.Guest.Problem)
	}
	if err != nil && !movedOn {
		src := CheckSource(ctx, l, vm, before, spec.DNS.Name, netip.MustParseAddrPort(spec.DNS.Server))
		out.Source = &src
	}
	if err != nil {
		out.Err = err.Error()
	}
	out.Exit = migrator.ExitCode(err)
	return out, err
}

// daemonsDatapath is the datapath key of the config StartDaemons wrote
// for site A's vmhopd ("" if there is none).
func daemonsDatapath(l *lab.Lab) string {
	b, err := os.ReadFile(DaemonConfig(l, lab.SiteA))
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok && k == "datapath" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// sourceGuest is l's guest at site A, once it answers, and its status
// before a move (its boot id: CheckGuest compares it after).
func sourceGuest(ctx context.Context, l *lab.Lab) (*lab.VM, guest.Status, error) {
	var vm *lab.VM
	for _, v := range l.State.VMs {
		if v.Host == lab.SiteA {
			vm = v
		}
	}
	if vm == nil {
		return nil, guest.Status{}, fmt.Errorf("lab %s has no VM at site A (start one: vmhop-lab vm start --name %s)", l.Name, l.Name)
	}
	if err := l.WaitGuest(ctx, vm.IP, 10*time.Second); err != nil {
		return nil, guest.Status{}, fmt.Errorf("guest at site A does not answer: %w", err)
	}
	before, err := l.GuestStatus(ctx, lab.Client, vm.IP)
	if err != nil {
		return nil, guest.Status{}, fmt.Errorf("guest status at site A: %w", err)
	}
	return vm, before, nil
}

// resultErr is a finished job's error as the migration core names it, so
// migrator.ExitCode and errors.Is see what vmhopd saw.
func resultErr(r *daemon.Result) error {
	switch {
	case r.OK:
		return nil
	case r.ExitCode == migrator.ExitUnhealthy:
		return fmt.Errorf("%w (vmhopd: %s)", migrator.ErrUnhealthy, r.Error)
	case r.ExitCode == migrator.ExitFollowUp:
		return fmt.Errorf("%w (vmhopd: %s)", migrator.ErrFollowUp, r.Error)
	}
	return fmt.Errorf("vmhopd: migration %s: %s", r.ID, r.Error)
}

// CheckGuest asks the guest at ip (from the client) for its account after
// a move: same boot as before, two full checks of its RAM working set with
// nothing lost, every disk record acknowledged so far read back intact. It
// waits up to 30 s for the RAM checks (TCG guests are slow after resume).
func CheckGuest(ctx context.Context, l *lab.Lab, ip netip.Addr, before guest.Status) GuestCheck {
	var g GuestCheck
	var first, s guest.Status
	deadline := time.Now().Add(30 * time.Second)
	for {
		var err error
		s, err = l.GuestStatus(ctx, lab.Client, ip)
		if err == nil {
			if !g.Answered {
				first = s
			}
			g.Answered = true
			if s.Mem == nil || first.Mem == nil || s.Mem.Cycles >= first.Mem.Cycles+2 {
				break
			}
		}
		if time.Now().After(deadline) {
			if !g.Answered {
				g.Problem = fmt.Sprintf("no answer from the guest at %s for 30s: %v", ip, err)
				return g
			}
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	g.SameBoot = s.BootID == before.BootID
	if s.Mem != nil && first.Mem != nil {
		g.MemCycles, g.MemLost, g.MemCorrupt = s.Mem.Cycles-first.Mem.Cycles, s.Mem.Lost, s.Mem.Corrupt
	}
	var problems []string
	if !g.SameBoot {
		problems = append(problems, fmt.Sprintf("boot id %s, was %s: the guest rebooted", s.BootID, before.BootID))
	}
	if s.Mem == nil {
		problems = append(problems, "RAM verifier off in the guest")
	} else if g.MemLost > 0 || g.MemCorrupt > 0 {
		problems = append(problems, fmt.Sprintf("RAM verifier: %d lost and %d corrupt pages, first %+v", g.MemLost, g.MemCorrupt, s.Mem.First))
	} else if g.MemCycles < 2 {
		problems = append(problems, fmt.Sprintf("RAM verifier checked the working set %d times in 30s, want 2", g.MemCycles))
	}
	if s.DiskAcked > 0 {
		r, err := l.GuestVerify(ctx, lab.Client, ip, s.DiskAcked)
		g.Disk = r
		if err != nil {
			problems = append(problems, "disk verify: "+err.Error())
		} else if !r.OK() {
			problems = append(problems, "disk: "+r.String())
		}
	}
	g.Problem = strings.Join(problems, "; ")
	return g
}

// Worst is the echo connection that saw the most disruption.
func (o Outcome) Worst() (int, EchoView) {
	w := -1
	for i, e := range o.Client.Echo {
		if w < 0 || e.Disruption.Total > o.Client.Echo[w].Disruption.Total {
			w = i
		}
	}
	if w < 0 {
		return -1, EchoView{}
	}
	return w, o.Client.Echo[w]
}

func (o Outcome) gapList(d Disruption) string {
	var gaps []string
	for _, g := range d.Worst {
		gaps = append(gaps, fmt.Sprintf("%s (%s, at %s)", g.Length.Round(time.Millisecond),
			o.phaseAt(g.Start), g.Start.Sub(o.Start).Round(100*time.Millisecond)))
	}
	if len(gaps) == 0 {
		return "none"
	}
	return strings.Join(gaps, ", ")
}

// Print writes the outcome for people.
func (o Outcome) Print(w io.Writer) {
	r := o.Report
	fmt.Fprintf(w, "migration: %s total\n", r.Total.Round(time.Millisecond))
	for _, ph := range r.Phases {
		fmt.Fprintf(w, "  %-15s %10s %s\n", ph.Name, ph.Duration.Round(time.Millisecond), ph.Err)
	}
	fmt.Fprintf(w, "memory: %d MiB in %d passes over %s; QEMU-reported pause %s (switchover hook %s)\n",
		r.Runtime.Transferred>>20, r.Runtime.Iterations, r.Runtime.Total.Round(time.Millisecond), r.Pause, r.Runtime.Hook.Round(time.Millisecond))
	fmt.Fprintf(w, "disk: %d MiB sent to the destination; digest %s, source = destination: %v (%d MiB hashed before the pause, %d MiB in it, %d chunks)\n",
		r.DiskWire>>20, r.Digest, r.DigestMatch, r.DigestRead>>20, r.VerifyRead>>20, r.VerifyChunks)
	if r.DiskRounds > 0 {
		fmt.Fprintf(w, "disk (chunked engine): %d rounds, %d connection cuts resumed, %d chunks sent inside the pause\n",
			r.DiskRounds, r.DiskCuts, r.VerifyChunks)
	}
	fmt.Fprintf(w, "dns: %v -> %v; waited the old TTL (%s) after prepare; resolvers may hold the old address %s after the flip\n",
		r.DNSBefore, r.DNSAfter, r.DNSWait, r.DNSCachedFor)
	fmt.Fprintf(w, "health check: %s\n", r.Health)
	for _, warn := range r.Warnings {
		fmt.Fprintf(w, "WARNING: %s\n", warn)
	}
	g := o.Guest
	switch {
	case !g.Answered:
		fmt.Fprintf(w, "guest: %s\n", g.Problem)
	default:
		fmt.Fprintf(w, "guest: same boot %v; RAM verifier: %d lost, %d corrupt pages in %d full checks after the move; disk: %s\n",
			g.SameBoot, g.MemLost, g.MemCorrupt, g.MemCycles, g.Disk)
		if g.Problem != "" {
			fmt.Fprintf(w, "guest PROBLEM: %s\n", g.Problem)
		}
	}
	c := o.Client
	fmt.Fprintf(w, "client load over %s (packet capture: %d packets):\n", c.End.Sub(c.Start).Round(100*time.Millisecond), o.Captured)
	for i, e := range c.Echo {
		d := e.Disruption
		fmt.Fprintf(w, "  echo %d: %d sent, %d answered, %d unanswered, %d reconnects; gaps %s in %d, longest %s\n",
			i+1, e.Sent, e.Got, e.Unanswered, e.Reconnects, d.Total.Round(time.Millisecond), d.Gaps, d.Longest.Round(time.Millisecond))
	}
	h := c.HTTP
	newAt := "never"
	if h.NewAddrAt > 0 {
		newAt = "at " + (h.NewAddrAt - o.Start.Sub(c.Start)).Round(100*time.Millisecond).String()
	}
	if h.Attempts > 0 {
		fmt.Fprintf(w, "  new HTTP connections by name: %d, %d failed (window %s, longest run %s); first on the new address %s; by address %v\n",
			h.Attempts, h.Failed, h.FailWindow.Round(time.Millisecond), h.Longest.Round(time.Millisecond), newAt, h.ByAddr)
		for _, e := range h.Errors {
			fmt.Fprintf(w, "    failed: %s\n", e)
		}
	}
	if c.Ping.Err != "" {
		fmt.Fprintf(w, "  icmp echo: did not run: %s\n", c.Ping.Err)
	}
	if pd := c.Ping.Disruption; c.Ping.Sent > 0 {
		fmt.Fprintf(w, "  icmp echo: %d sent, %d answered, %d lost; gaps %s in %d, longest %s\n",
			c.Ping.Sent, c.Ping.Answered, c.Ping.Lost, pd.Total.Round(time.Millisecond), pd.Gaps, pd.Longest.Round(time.Millisecond))
	}
	if i, e := o.Worst(); i >= 0 {
		d := e.Disruption
		fmt.Fprintf(w, "client-visible disruption (worst echo connection, %d): %s in %d gaps, longest %s\n",
			i+1, d.Total.Round(time.Millisecond), d.Gaps, d.Longest.Round(time.Millisecond))
		fmt.Fprintf(w, "  longest gaps: %s\n  (gaps over %s count, minus the %s probe interval; a trailing gap runs to the end of the load)\n",
			o.gapList(d), d.Threshold, d.Interval)
		fmt.Fprintf(w, "  outages (gaps over %s only): %s in %d\n", d.OutageThreshold, d.Outage.Round(time.Millisecond), d.Outages)
	}
	if o.Drained > 0 {
		fmt.Fprintf(w, "redirect drained after %s\n", o.Drained.Round(time.Millisecond))
	}
	if o.Err != "" {
		fmt.Fprintf(w, "FAILED (exit %d): %s\n", o.Exit, o.Err)
	}
}
