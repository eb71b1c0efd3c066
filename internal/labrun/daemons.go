package labrun

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmhop/vmhop/daemon"
	"github.com/vmhop/vmhop/daemon/pki"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
)

// The lab runs the product as two hosts would: a vmhopd in each site's
// namespace, as its own process, with its own config file, key and
// certificate (signed by the lab's CA), its datapath on the site's
// uplink; what configs/vmhopd.service would run on a host.

// DaemonPort is the port of each site's vmhopd peer API.
const DaemonPort = 7710

// MigrationPorts is each lab vmhopd's vmhopd.migration_ports: the
// ports of incoming migrations (the default range, written out).
var MigrationPorts = config.DefaultDaemon().MigrationPorts

// ListenersInRange are the TCP listeners of ss -Hltn output whose local
// port is in rng, one line each (none: the migrations left nothing).
func ListenersInRange(ssOut string, rng config.PortRange) []string {
	var out []string
	for _, line := range strings.Split(ssOut, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		local := f[3]
		i := strings.LastIndex(local, ":")
		if i < 0 {
			continue
		}
		if p, err := strconv.ParseUint(local[i+1:], 10, 16); err == nil && rng.Contains(uint16(p)) {
			out = append(out, line)
		}
	}
	return out
}

// daemonSites are the sites that run a vmhopd, with their WAN addresses.
var daemonSites = []struct {
	site string
	addr netip.Addr
}{{lab.SiteA, lab.HostA}, {lab.SiteB, lab.HostB}}

// DaemonName is the name of site's vmhopd: its certificate's DNS name.
func DaemonName(site string) string { return strings.ToLower(site) + ".lab.vmhop" }

// DaemonAddr is the host:port of site's vmhopd peer API.
func DaemonAddr(site string) string {
	for _, s := range daemonSites {
		if s.site == site {
			return netip.AddrPortFrom(s.addr, DaemonPort).String()
		}
	}
	return ""
}

// DaemonSocket is the local API socket of site's vmhopd (vmhop --socket).
func DaemonSocket(l *lab.Lab, site string) string { return l.Path("vmhopd-" + site + ".sock") }

// DaemonConfig is the config file of site's vmhopd.
func DaemonConfig(l *lab.Lab, site string) string { return l.Path("vmhopd-" + site + ".yaml") }

// DaemonStateDir is site's vmhopd.state_dir.
func DaemonStateDir(l *lab.Lab, site string) string { return l.Path("vmhopd-" + site) }

// DaemonsRunning says whether both sites' vmhopd answer on their sockets.
func DaemonsRunning(ctx context.Context, l *lab.Lab) bool {
	for _, s := range daemonSites {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := daemon.NewLocalClient(DaemonSocket(l, s.site)).Status(ctx)
		cancel()
		if err != nil {
			return false
		}
	}
	return true
}

// StartDaemons writes a CA, a key and certificate per site, and each
// site's vmhopd config, then starts vmhopd in each site's namespace and
// waits until both answer on their sockets and see each other. The
// vmhopd binary is $VMHOPD, else vmhopd beside this program, else built
// from this module (go build) into the lab's directory.
//
// Options: Continuity sets both daemons' datapath key ("ebpf", the
// default, or "userspace").
func StartDaemons(ctx context.Context, l *lab.Lab, opts ...Option) error {
	o := options{continuity: "ebpf"}
	for _, opt := range opts {
		opt(&o)
	}
	if o.continuity == "" {
		o.continuity = "ebpf"
	}
	ca, err := pki.NewCA("vmhop lab "+l.Name, 7*24*time.Hour)
	if err != nil {
		return err
	}
	pkiDir := l.Path("pki")
	if err := os.MkdirAll(pkiDir, 0o700); err != nil {
		return err
	}
	caFile := filepath.Join(pkiDir, "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM(), 0o644); err != nil {
		return err
	}
	for _, s := range daemonSites {
		cert, key, err := ca.Issue(DaemonName(s.site), []netip.Addr{s.addr}, 7*24*time.Hour)
		if err != nil {
			return err
		}
		certFile, keyFile := filepath.Join(pkiDir, s.site+".pem"), filepath.Join(pkiDir, s.site+"-key.pem")
		if err := os.WriteFile(certFile, cert, 0o644); err != nil {
			return err
		}
		if err := os.WriteFile(keyFile, key, 0o600); err != nil {
			return err
		}
		var peers strings.Builder
		for _, o := range daemonSites {
			if o.site != s.site {
				fmt.Fprintf(&peers, "    - name: %s\n      address: %s\n", DaemonName(o.site), DaemonAddr(o.site))
			}
		}
		conf := fmt.Sprintf(`# vmhopd of lab %s, %s (written by the lab; what /etc/vmhop/vmhopd.yaml is on a host)
vmhopd:
  name: %s
  listen: %s
  socket: %s
  peers:
%s  state_dir: %s
  uplink: %s
  address: %s
  datapath: %s
  bpffs: %s
  tls:
    cert: %s
    key: %s
    ca: %s
  log_level: info
  metrics_listen: 127.0.0.1:9710
  migration_ports: %s
`, l.Name, s.site, DaemonName(s.site), DaemonAddr(s.site), DaemonSocket(l, s.site), peers.String(),
			DaemonStateDir(l, s.site), lab.Uplink, s.addr, o.continuity, l.PinDir(s.site), certFile, keyFile, caFile, MigrationPorts)
		if err := os.WriteFile(DaemonConfig(l, s.site), []byte(conf), 0o644); err != nil {
			return err
		}
	}
	for _, s := range daemonSites {
		if err := StartDaemon(ctx, l, s.site); err != nil {
			return err
		}
	}
	return lab.WaitFor(ctx, 20*time.Second, func() error {
		for _, s := range daemonSites {
			peers, err := daemon.NewLocalClient(DaemonSocket(l, s.site)).Peers(ctx)
			if err != nil {
				return fmt.Errorf("vmhopd at %s: %w", s.site, err)
			}
			for _, p := range peers {
				if !p.Authenticated {
					return fmt.Errorf("vmhopd at %s: peer %s: %s", s.site, p.Name, p.Error)
				}
			}
		}
		return nil
	})
}

// StartDaemon starts site's vmhopd from the config StartDaemons wrote
// (in the site's network namespace only, as its own process: it pins its
// datapath in the host's /sys/fs/bpf) and waits until it answers on its
// socket. Its output goes to vmhopd-SITE.log in the lab's directory (a
// restarted one's to vmhopd-SITE-N.log).
func StartDaemon(ctx context.Context, l *lab.Lab, site string) error {
	bin, err := vmhopdBinary(ctx, l)
	if err != nil {
		return err
	}
	logName := "vmhopd-" + site + ".log"
	for n := 2; ; n++ {
		if _, err := os.Stat(l.Path(logName)); err != nil {
			break
		}
		logName = fmt.Sprintf("vmhopd-%s-%d.log", site, n)
	}
	p, err := l.StartNetOnly(site, logName, bin, "-config", DaemonConfig(l, site))
	if err != nil {
		return err
	}
	return lab.WaitFor(ctx, 20*time.Second, func() error {
		if isDone(p.Exited()) {
			log, _ := os.ReadFile(l.Path(logName))
			return fmt.Errorf("vmhopd at %s exited: %s", site, bytes.TrimSpace(log))
		}
		_, err := daemon.NewLocalClient(DaemonSocket(l, site)).Status(ctx)
		return err
	})
}

// vmhopdBinary finds or builds the vmhopd the lab runs.
func vmhopdBinary(ctx context.Context, l *lab.Lab) (string, error) {
	if b := os.Getenv("VMHOPD"); b != "" {
		return b, nil
	}
	if exe, err := os.Executable(); err == nil {
		if b := filepath.Join(filepath.Dir(exe), "vmhopd"); isExecutable(b) {
			return b, nil
		}
	}
	b := l.Path("vmhopd")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", b, "github.com/vmhop/vmhop/cmd/vmhopd").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build vmhopd for the lab (or set VMHOPD): %w: %s", err, out)
	}
	return b, nil
}

func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
