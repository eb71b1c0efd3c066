package config

import (
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

func TestExampleConfigsAreValid(t *testing.T) {
	d, err := LoadDaemon("../../configs/vmhopd.yaml")
	if err != nil {
		t.Fatalf("configs/vmhopd.yaml: %v", err)
	}
	if d.Uplink != "eth0" || d.Address.String() != "10.1.0.2" || d.Datapath != "auto" {
		t.Errorf("daemon = %+v", d)
	}
	m, err := LoadMigration("../../configs/migration.yaml")
	if err != nil {
		t.Fatalf("configs/migration.yaml: %v", err)
	}
	if m.Network.NewIP.String() != "10.2.0.10" || m.Limits.Bandwidth != 100*units.Mbit ||
		m.Limits.Downtime != 300*time.Millisecond || m.Storage.FinalDelta != 16*units.MiB {
		t.Errorf("migration = %+v", m)
	}
}

// base is a minimal valid migration spec; cases below edit one line of it.
const base = `migration:
  name: web1
  vm: {hypervisor: qemu, qmp_socket: /run/q.sock, disk: /d.raw}
  source: {daemon: "10.1.0.2:7710", address: 10.1.0.2}
  destination: {daemon: "10.2.0.2:7710", address: 10.2.0.2, disk: /d.raw, tap: tap-web1}
  network: {old_ip: 10.1.0.10, new_ip: 10.2.0.10, gateway: 10.1.0.1}
  dns: {server: "10.0.3.2:53", zone: example., name: svc.example., tsig_key_file: /k}
`

func TestParseErrorsNameKeyAndValue(t *testing.T) {
	tests := []struct {
		name string
		from string // replaced in base...
		to   string // ...by this
		want []string
	}{
		{"valid", "", "", nil},
		{"bad new ip", "new_ip: 10.2.0.10", "new_ip: 10.2.0.300",
			[]string{`migration.network.new_ip: "10.2.0.300" is not an IPv4 or IPv6 address`}},
		{"same ips", "new_ip: 10.2.0.10", "new_ip: 10.1.0.10",
			[]string{`migration.network.new_ip: "10.1.0.10" equals old_ip`}},
		{"mixed family", "new_ip: 10.2.0.10", "new_ip: '2001:db8::10'",
			[]string{`migration.network.new_ip: "2001:db8::10" is IPv6: new_ip is the VM's IPv4 side; put its IPv6 address in new_ip6`}},
		{"ipv6 vm", "old_ip: 10.1.0.10, new_ip: 10.2.0.10", "old_ip: '2001:db8:1::10', new_ip: '2001:db8:2::10'",
			[]string{`migration.network.old_ip: "2001:db8:1::10" is IPv6: old_ip is the VM's IPv4 side; put its IPv6 address in old_ip6 (a VM without IPv4 is not supported)`,
				`migration.network.new_ip: "2001:db8:2::10" is IPv6`}},
		{"ipv6 host", `"10.2.0.2:7710", address: 10.2.0.2`, `"[2001:db8::2]:7710", address: '2001:db8::2'`,
			[]string{`migration.destination.address: "2001:db8::2" is IPv6: the tunnel between the hosts is IPv4`}},
		// The dual-stack keys: all three or none, IPv6 each.
		{"dual stack", "gateway: 10.1.0.1}", "gateway: 10.1.0.1, old_ip6: 'fd00:1::10', new_ip6: 'fd00:2::10', gateway6: 'fe80::1'}", nil},
		{"dual stack needs all three", "gateway: 10.1.0.1}", "gateway: 10.1.0.1, old_ip6: 'fd00:1::10'}",
			[]string{`migration.network.new_ip6: required with the other IPv6 keys`, `migration.network.gateway6: required with the other IPv6 keys`}},
		{"ipv4 in an ipv6 key", "gateway: 10.1.0.1}", "gateway: 10.1.0.1, old_ip6: '::ffff:10.1.0.10', new_ip6: 'fe80::10', gateway6: 'fd00:2::11'}",
			[]string{`migration.network.old_ip6: "10.1.0.10" is IPv4: old_ip6 takes the VM's IPv6 address at the source site (the IPv4 side is old_ip)`,
				`migration.network.new_ip6: "fe80::10" is link-local`}},
		{"ipv6 gateway is the vm", "gateway: 10.1.0.1}", "gateway: 10.1.0.1, old_ip6: 'fd00:1::10', new_ip6: 'fd00:2::10', gateway6: 'fd00:2::10'}",
			[]string{`migration.network.gateway6: "fd00:2::10" is the VM's own address`}},
		{"unknown key", "gateway: 10.1.0.1}", "gateway: 10.1.0.1, gatway: 1}",
			[]string{`migration.network.gatway: unknown key`}},
		{"unknown top key", "migration:", "extra: 1\nmigration:",
			[]string{`extra: unknown top-level key`}},
		{"bad hypervisor", "hypervisor: qemu", "hypervisor: xen",
			[]string{`migration.vm.hypervisor: "xen" is not one of qemu, virtualbox`}},
		{"virtualbox needs chunked", "hypervisor: qemu, qmp_socket: /run/q.sock", "hypervisor: virtualbox, name: v",
			[]string{`migration.storage.mode: "qemu" needs QEMU`}},
		{"relative disk", "disk: /d.raw,", "disk: d.raw,",
			[]string{`migration.destination.disk: "d.raw" is not an absolute path`}},
		{"no tap", ", tap: tap-web1}", "}",
			[]string{`migration.destination.tap: "" is not an interface name (required for qemu`}},
		{"long tap", "tap: tap-web1}", "tap: a-sixteen-byte-nm}",
			[]string{`migration.destination.tap: "a-sixteen-byte-nm" is not an interface name`}},
		{"relative dest qmp", "tap: tap-web1}", "tap: tap-web1, qmp_socket: q.sock}",
			[]string{`migration.destination.qmp_socket: "q.sock" is not an absolute path`}},
		{"bad port", `"10.2.0.2:7710"`, `"10.2.0.2:99999"`,
			[]string{`migration.destination.daemon: "10.2.0.2:99999": port "99999" is not from 1 to 65535`}},
		{"name outside zone", "name: svc.example.", "name: svc.other.",
			[]string{`migration.dns.name: "svc.other." is not inside zone "example."`}},
		{"not fqdn", "zone: example.", "zone: example",
			[]string{`migration.dns.zone: "example" is not a fully qualified domain name`}},
		{"bad duration", "tsig_key_file: /k}", "tsig_key_file: /k, timeout: soon}",
			[]string{`migration.dns.timeout: "soon" is not a duration`}},
		{"bad rate", "name: web1", "name: web1\n  limits: {bandwidth: fast}",
			[]string{`migration.limits.bandwidth: "fast" is not a bit rate`}},
		{"bad congestion control", "name: web1", "name: web1\n  limits: {congestion: BBR v2}",
			[]string{`migration.limits.congestion: "BBR v2" is not a TCP congestion control name`}},
		{"congestion and pacing", "name: web1", "name: web1\n  limits: {congestion: bbr, pacing: budget}", nil},
		{"bad pacing", "name: web1", "name: web1\n  limits: {pacing: true}",
			[]string{`migration.limits.pacing: "true" is not one of off, budget, yield`}},
		{"chunk not power of two", "name: web1", "name: web1\n  storage: {chunk_size: 3MiB}",
			[]string{`migration.storage.chunk_size: "3MiB" is not a power of two`}},
		{"wrong type", "name: web1", "name: web1\n  limits: {max_iterations: many}",
			[]string{`migration.limits.max_iterations: "many" is not a whole number`}},
		{"mapping expected", "network: {", "network: 5\n  x: {",
			[]string{`migration.network: want a mapping, got 5`}},
		// Keys differing only in case, and dotted keys, are what viper hides.
		{"key twice in other case", "new_ip: 10.2.0.10,", "new_ip: 10.2.0.10, New_IP: 10.9.9.9,",
			[]string{`migration.network.New_IP: line 6 differs only in case from "new_ip" of line 6`}},
		{"section twice in other case", "name: web1", "name: web1\n  limits: {downtime: 1s}\n  LIMITS: {deadline: 1h}",
			[]string{`migration.LIMITS: line 4 differs only in case from "limits" of line 3: one would silently replace the other`}},
		{"exact repeat", "name: web1", "name: web1\n  name: web2",
			[]string{`migration.name: line 3 repeats "name" of line 2`}},
		{"dotted key", "name: web1", "name: web1\n  \"network.new_ip\": 10.9.9.9",
			[]string{`migration."network.new_ip": line 3: unknown key: a dot does not nest keys here; write "new_ip" under "migration.network"`}},
		// Bytes and bits: a capital B is bytes; a lone lowercase b is refused.
		{"rate in bytes", "name: web1", "name: web1\n  limits: {bandwidth: 12.5MBps}", nil},
		{"ambiguous rate", "name: web1", "name: web1\n  limits: {bandwidth: 100mbps}",
			[]string{`migration.limits.bandwidth: "100mbps" is ambiguous`, `write "100mbit" for bits or "100MB/s" for bytes per second`}},
		// Addresses that cannot all be right.
		{"new ip is host B's", "new_ip: 10.2.0.10", "new_ip: 10.2.0.2",
			[]string{`migration.network.new_ip: "10.2.0.2" is host B's own address (destination.address)`}},
		{"old ip is host A's", "old_ip: 10.1.0.10", "old_ip: 10.1.0.2",
			[]string{`migration.network.old_ip: "10.1.0.2" is host A's own address (source.address)`}},
		{"gateway is old ip", "gateway: 10.1.0.1", "gateway: 10.1.0.10",
			[]string{`migration.network.gateway: "10.1.0.10" equals old_ip`}},
		{"gateway is new ip", "gateway: 10.1.0.1", "gateway: 10.2.0.10",
			[]string{`migration.network.gateway: "10.2.0.10" equals new_ip`}},
		{"several errors reported together", "old_ip: 10.1.0.10, new_ip: 10.2.0.10", "old_ip: x, new_ip: y",
			[]string{`migration.network.old_ip: "x"`, `migration.network.new_ip: "y"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := base
			if tt.from != "" {
				if !strings.Contains(base, tt.from) {
					t.Fatalf("test bug: %q not in base", tt.from)
				}
				text = strings.Replace(base, tt.from, tt.to, 1)
			}
			f, err := Parse([]byte(text))
			if tt.want == nil {
				if tt.name == "rate in bytes" && err == nil && f.Migration.Limits.Bandwidth != 100*units.Mbit {
					t.Fatalf("12.5MBps = %v, want 100mbit", f.Migration.Limits.Bandwidth)
				}
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if f.Migration == nil || f.Kind() != "migration" {
					t.Fatalf("kind = %s", f.Kind())
				}
				return
			}
			var errs Errors
			if !errors.As(err, &errs) {
				t.Fatalf("Parse error = %v, want Errors", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

func TestParseDaemon(t *testing.T) {
	f, err := Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n"))
	if err != nil {
		t.Fatal(err)
	}
	if f.Kind() != "vmhopd" || f.Daemon.Listen != "0.0.0.0:7710" || f.Daemon.Uplink != "eth1" {
		t.Errorf("daemon = %+v", f.Daemon)
	}
	_, err = Parse([]byte("vmhopd:\n  uplink: an-interface-name-too-long\n  address: 10.2.0.2\n  datapath: xdp\n  tls: {cert: /c}\n"))
	for _, w := range []string{
		`vmhopd.uplink: "an-interface-name-too-long" is not an interface name`,
		`vmhopd.datapath: "xdp" is not one of auto, ebpf, userspace`,
		`vmhopd.tls.key: required with the other tls keys`,
		`vmhopd.tls.ca: required with the other tls keys`,
		`vmhopd.name: required with tls`,
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error %v does not contain %q", err, w)
		}
	}
}

func TestParseDaemonLogFormatAndMetrics(t *testing.T) {
	f, err := Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n  log_format: json\n  metrics_listen: \"127.0.0.1:9710\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if f.Daemon.LogFormat != "json" || f.Daemon.MetricsListen != "127.0.0.1:9710" {
		t.Errorf("daemon = %+v", f.Daemon)
	}
	if f, err := Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n")); err != nil || f.Daemon.LogFormat != "text" || f.Daemon.MetricsListen != "" {
		t.Errorf("defaults: %+v, %v", f, err)
	}
	_, err = Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n  log_format: xml\n  metrics_listen: \"localhost:99999\"\n"))
	for _, want := range []string{
		`vmhopd.log_format: "xml" is not one of text, json`,
		`vmhopd.metrics_listen: "localhost:99999": port "99999" is not from 1 to 65535`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v\nlacks %q", err, want)
		}
	}
}

func TestParseDaemonPeers(t *testing.T) {
	const tls = "  tls: {cert: /c.pem, key: /k.pem, ca: /ca.pem}\n"
	f, err := Parse([]byte("vmhopd:\n  name: site-a.vmhop\n  uplink: eth0\n  address: 10.1.0.2\n" + tls +
		"  peers:\n    - {name: site-b.vmhop, address: \"10.2.0.2:7710\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Peer{{Name: "site-b.vmhop", Address: "10.2.0.2:7710"}}
	if d := f.Daemon; d.Name != "site-a.vmhop" || len(d.Peers) != 1 || d.Peers[0] != want[0] || d.Socket != "/run/vmhop/vmhopd.sock" {
		t.Errorf("daemon = %+v", d)
	}
	_, err = Parse([]byte("vmhopd:\n  name: a\n  uplink: eth0\n  address: 10.1.0.2\n  socket: run/s\n" + tls +
		"  peers:\n    - {name: a, address: \"10.2.0.2:7710\"}\n    - {name: b_x, address: nowhere}\n" +
		"    - {name: c, address: \"10.3.0.2:7710\"}\n    - {name: c, address: \"10.3.0.2:7710\"}\n"))
	for _, w := range []string{
		`vmhopd.socket: "run/s" is not an absolute path`,
		`vmhopd.peers[0].name: "a" is this host's own name`,
		`vmhopd.peers[1].name: "b_x" is not a host name`,
		`vmhopd.peers[1].address: "nowhere" is not host:port`,
		`vmhopd.peers[3].name: "c" is listed twice`,
	} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("error %v does not contain %q", err, w)
		}
	}
	_, err = Parse([]byte("vmhopd:\n  uplink: eth0\n  address: 10.1.0.2\n  peers: [{name: b, address: \"10.2.0.2:7710\"}]\n"))
	if err == nil || !strings.Contains(err.Error(), `vmhopd.peers: need tls`) {
		t.Errorf("peers without tls: %v", err)
	}
}

func TestParseRejectsNonConfigs(t *testing.T) {
	for _, text := range []string{"", "a: 1", "vmhopd: {}\nmigration: {}", "migration: [1, 2]", ":::"} {
		if _, err := Parse([]byte(text)); err == nil {
			t.Errorf("Parse(%q) succeeded", text)
		}
	}
}

func TestLoadMigrationRejectsDaemonFile(t *testing.T) {
	_, err := LoadMigration("../../configs/vmhopd.yaml")
	if err == nil || !strings.Contains(err.Error(), "want a migration spec") {
		t.Errorf("err = %v", err)
	}
}

func FuzzParse(f *testing.F) {
	for _, p := range []string{"../../configs/vmhopd.yaml", "../../configs/migration.yaml"} {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(base))
	// Keys viper would merge: case twins, dotted keys, a merge key.
	f.Add([]byte("migration:\n  name: a\n  NAME: b\n  \"vm.disk\": /x\n  x: &a {k: 1}\n  y: {<<: *a, K: 2}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Parse(data)
		if err != nil {
			var errs Errors
			if errors.As(err, &errs) {
				for _, e := range errs {
					if e.Key == "" || e.Msg == "" {
						t.Fatalf("error without key or message: %#v", e)
					}
				}
			}
			return
		}
		if (file.Daemon == nil) == (file.Migration == nil) {
			t.Fatalf("exactly one kind must be set: %+v", file)
		}
	})
}

func TestEffectiveListsEveryKeyWithUnits(t *testing.T) {
	f, err := Parse([]byte(strings.Replace(base, "name: web1", "name: web1\n  limits: {bandwidth: 12.5MB/s}", 1)))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, s := range f.Effective() {
		got[s.Key] = s.Value
	}
	for k, want := range map[string]string{
		"migration.limits.bandwidth":    "100mbit (100000000 bit/s = 12.5 MB/s)", // set
		"migration.storage.final_delta": "16MiB (16777216 bytes)",                // default
		"migration.dns.ttl":             "5 seconds",
		"migration.network.drain_idle":  "30s",
		"migration.network.new_ip":      "10.2.0.10",
		"migration.network.redirect":    "true",
		"migration.limits.pacing":       `"yield"`,
	} {
		if got[k] != want {
			t.Errorf("%s = %q, want %q", k, got[k], want)
		}
	}
}

// TestMarshalMigrationRoundTrips: a spec written by MarshalMigration
// parses back to the same struct, every key and unit included.
func TestMarshalMigrationRoundTrips(t *testing.T) {
	f, err := Parse([]byte(base))
	if err != nil {
		t.Fatal(err)
	}
	m := f.Migration
	m.Limits.Bandwidth, m.Storage.ChunkSize, m.Destination.QMPSocket = 90*units.Mbit, 4*units.MiB, "/run/x.qmp"
	m.Network.Redirect, m.Limits.Pacing, m.Limits.Congestion = false, "off", "bbr"
	b, err := MarshalMigration(m)
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(b)
	if err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	if !reflect.DeepEqual(back.Migration, m) {
		t.Errorf("round trip:\n%+v\nwant\n%+v\nfile:\n%s", back.Migration, m, b)
	}
}

// TestDualStackSpec: a spec with the three IPv6 keys is valid and its
// address lists (the DNS flip's from and to) hold both families.
func TestDualStackSpec(t *testing.T) {
	text := strings.Replace(base, "gateway: 10.1.0.1}", "gateway: 10.1.0.1, old_ip6: 'fd00:1::10', new_ip6: 'fd00:2::10', gateway6: 'fe80::1'}", 1)
	f, err := Parse([]byte(text))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	n := f.Migration.Network
	if got := fmt.Sprint(n.OldAddrs(), n.NewAddrs(), n.Gateway6); got != "[10.1.0.10 fd00:1::10] [10.2.0.10 fd00:2::10] fe80::1" {
		t.Errorf("addresses = %s", got)
	}
	// vmhopd hands the spec on as MarshalMigration writes it.
	b, err := MarshalMigration(f.Migration)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := Parse(b); err != nil || back.Migration.Network != n {
		t.Errorf("round trip: %+v, %v\n%s", back, err, b)
	}
	f, err = Parse([]byte(base))
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.Migration.Network.OldAddrs(), f.Migration.Network.NewAddrs()); got != "[10.1.0.10] [10.2.0.10]" {
		t.Errorf("IPv4-only addresses = %s", got)
	}
}

func TestParseDaemonMigrationPorts(t *testing.T) {
	f, err := Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n  migration_ports: 50000-50007\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Daemon.MigrationPorts; got != (PortRange{50000, 50007}) || got.Len() != 8 || got.String() != "50000-50007" {
		t.Errorf("migration_ports = %+v", got)
	}
	if f, err := Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n")); err != nil || f.Daemon.MigrationPorts != (PortRange{49152, 49215}) {
		t.Errorf("default: %+v, %v", f, err)
	}
	for in, want := range map[string]string{
		"49152":       `vmhopd.migration_ports: "49152" is not a port range MIN-MAX`,
		"50010-50000": `vmhopd.migration_ports: "50010-50000": MIN 50010 is above MAX 50000`,
		"80-90":       `vmhopd.migration_ports: "80-90": 80 is a privileged port`,
		"50000-50002": `vmhopd.migration_ports: "50000-50002" holds 3 ports: one incoming migration takes 4`,
		"50000-70000": `vmhopd.migration_ports: "50000-70000" is not a port range MIN-MAX of ports from 1024 to 65535`,
		"7700-7720":   `vmhopd.migration_ports: 7700-7720 holds vmhopd.listen's port 7710`,
	} {
		_, err := Parse([]byte("vmhopd:\n  uplink: eth1\n  address: 10.2.0.2\n  migration_ports: " + in + "\n"))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("migration_ports %s: error %v\nlacks %q", in, err, want)
		}
	}
}
