package labrun

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/vmhop/vmhop/internal/guest"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
)

// SourceState is the source VM as a failed move left it. A failed
// migration must leave the VM running at the source, the same boot,
// answering at its address, its name still pointing there: Safe says
// whether it did; the other fields say what was found.
type SourceState struct {
	// QEMU is the source's QEMU process: "running", or how it ended
	// ("exited: exit status 0"; QEMU exits 0 when the guest reboots,
	// the lab running it with -no-reboot).
	QEMU string `json:"qemu"`
	// QMPStatus is QMP query-status's status ("running", "paused", ...),
	// or why it could not be asked.
	QMPStatus string `json:"qmp_status"`
	// Moved: the source QEMU sent the VM away (QMP status postmigrate):
	// the failure came after the switch, and the guest that answers at
	// the old address is the destination's, through the redirect.
	Moved bool `json:"moved,omitempty"`
	// Answers: the guest answered its status page at its old address
	// from the client; SameBoot: with the boot id it had before the move.
	Answers  bool `json:"answers"`
	SameBoot bool `json:"same_boot"`
	// Console is the guest console's last kernel panic or out-of-memory
	// line, if any (why a guest that died died).
	Console string `json:"console,omitempty"`
	// DNS is what the lab's DNS server answers for the service's name;
	// DNSUnchanged: the VM's old address.
	DNS          string `json:"dns"`
	DNSUnchanged bool   `json:"dns_unchanged"`
	Safe         bool   `json:"safe"`
}

// Summary is the state in one line: "safe: ..." or "NOT SAFE: ...".
func (s SourceState) Summary() string {
	var parts []string
	if s.Moved {
		parts = append(parts, "the VM moved (the failure came after the switch; the source QEMU sent it: postmigrate)")
	}
	parts = append(parts, "QEMU "+s.QEMU, "QMP status "+s.QMPStatus)
	switch {
	case s.Answers && s.SameBoot:
		parts = append(parts, "the guest answers (same boot)")
	case s.Answers:
		parts = append(parts, "the guest answers, REBOOTED")
	default:
		parts = append(parts, "the guest does not answer")
	}
	if s.Console != "" {
		parts = append(parts, fmt.Sprintf("guest console: %q", s.Console))
	}
	dns := "DNS " + s.DNS
	if s.DNSUnchanged {
		dns += " (unchanged)"
	} else {
		dns += " (CHANGED)"
	}
	parts = append(parts, dns)
	verdict := "safe"
	switch {
	case s.Moved:
		verdict = "moved, not at the source"
	case !s.Safe:
		verdict = "NOT SAFE"
	}
	return verdict + ": " + strings.Join(parts, ", ")
}

// CheckSource looks at the source VM vm after a failed move: its QEMU
// process, QMP status, the guest at its address (before is its status
// before the move), the guest console's last panic, and what DNS answers
// for name (server: the lab's DNS). It takes at most about 15 s.
func CheckSource(ctx context.Context, l *lab.Lab, vm *lab.VM, before guest.Status, name string, server netip.AddrPort) SourceState {
	var s SourceState
	s.QEMU = "running"
	if p := l.VMProcess(vm.Machine.Name); p != nil {
		if st := p.ExitStatus(); st != "" {
			s.QEMU = "exited: " + st
		}
	} else if vm.Pid > 0 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", vm.Pid)); err != nil {
			s.QEMU = fmt.Sprintf("gone (pid %d)", vm.Pid)
		}
	}
	qctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	s.QMPStatus = sourceQMPStatus(qctx, vm.Machine.QMPSocket)
	cancel()
	s.Moved = s.QMPStatus == "postmigrate"
	// A guest recovering from the load may answer late: a few tries.
	for i := 0; i < 5; i++ {
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := l.GuestStatus(gctx, lab.Client, vm.IP)
		cancel()
		if err == nil {
			s.Answers, s.SameBoot = true, st.BootID == before.BootID
			break
		}
		if !strings.HasPrefix(s.QEMU, "running") {
			break
		}
		time.Sleep(time.Second)
	}
	if b, err := os.ReadFile(vm.Machine.Console); err == nil {
		s.Console = lastPanic(string(b))
	}
	s.DNS = lookup(ctx, l, name, server)
	s.DNSUnchanged = s.DNS == vm.IP.String()
	s.Safe = s.QEMU == "running" && s.QMPStatus == "running" && s.Answers && s.SameBoot && s.DNSUnchanged
	return s
}

// sourceQMPStatus is QMP query-status's status of the QEMU at socket, or why
// it could not be asked.
func sourceQMPStatus(ctx context.Context, socket string) string {
	m, err := qemu.Dial(ctx, socket)
	if err != nil {
		return "unreachable (" + err.Error() + ")"
	}
	defer m.Close()
	var st struct {
		Status string `json:"status"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return "unreachable (" + err.Error() + ")"
	}
	return st.Status
}

// lastPanic is the last line of a guest console that says why the guest
// died (a kernel panic, the OOM killer), its timestamp cut; "" if none.
func lastPanic(console string) string {
	var last string
	for _, line := range strings.Split(console, "\n") {
		if strings.Contains(line, "Kernel panic") || strings.Contains(line, "Out of memory") || strings.Contains(line, "invoked oom-killer") {
			last = line
		}
	}
	if i := strings.Index(last, "] "); strings.HasPrefix(last, "[") && i > 0 {
		last = last[i+2:]
	}
	return strings.TrimSpace(last)
}

// lookup is name's first IPv4 address from the DNS server, asked from
// the client, or why there is none.
func lookup(ctx context.Context, l *lab.Lab, name string, server netip.AddrPort) string {
	dial := l.Dialer(lab.Client)
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dial(ctx, network, server.String())
	}}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	addrs, err := r.LookupNetIP(ctx, "ip4", name)
	if err != nil {
		return "no answer (" + err.Error() + ")"
	}
	if len(addrs) == 0 {
		return "no address"
	}
	return addrs[0].String()
}
