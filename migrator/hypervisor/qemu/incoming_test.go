package qemu

import (
	"context"
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestIncomingRequestsAreJSON: the destination half's requests survive a
// JSON round trip, so vmhopd's peer channel can carry them.
func TestIncomingRequestsAreJSON(t *testing.T) {
	for _, v := range []any{
		&IncomingStart{Name: "vm-siteB", Program: "qemu-system-x86_64", Args: []string{"-m", "131080k", "-incoming", "defer"},
			QMPSocket: "/run/vmhop/vm.qmp", Listen: netip.MustParseAddrPort("10.2.0.2:4444"), Multifd: 2,
			PSK: &PSKSecret{Username: "vmhop", KeyHex: strings.Repeat("ab", 32), Dir: "/run/vmhop/tls"}},
		&Query{Command: "query-version"},
		&DiskExport{Listen: netip.MustParseAddrPort("127.0.0.1:10809"), Node: "disk0", TLS: true},
		&RunningWait{Timeout: 30 * time.Second},
	} {
		j, err := json.Marshal(v)
		if err != nil {
			t.Fatalf("%T: %v", v, err)
		}
		back := reflect.New(reflect.TypeOf(v).Elem()).Interface()
		if err := json.Unmarshal(j, back); err != nil || !reflect.DeepEqual(v, back) {
			t.Errorf("%T: %s came back as %+v (%v)", v, j, back, err)
		}
	}
}

// TestIncomingRefuses: only query-* commands cross as queries, nothing
// runs before Start, and a short PSK is refused before QEMU starts.
func TestIncomingRefuses(t *testing.T) {
	l := &LocalIncoming{}
	ctx := context.Background()
	if _, err := l.Query(ctx, Query{Command: "quit"}); err == nil || !strings.Contains(err.Error(), "only query-* commands") {
		t.Errorf("query quit: %v", err)
	}
	if _, err := l.Query(ctx, Query{Command: "query-status"}); err == nil || !strings.Contains(err.Error(), "not started") {
		t.Errorf("query before start: %v", err)
	}
	if err := l.ExportDisk(ctx, DiskExport{Node: "disk0"}); err == nil {
		t.Error("export before start")
	}
	if err := l.UnexportDisk(ctx); err != nil {
		t.Errorf("unexport with nothing exported: %v", err)
	}
	err := l.Start(ctx, IncomingStart{QMPSocket: t.TempDir() + "/q", PSK: &PSKSecret{KeyHex: "abcd", Dir: t.TempDir()}})
	if err == nil || !strings.Contains(err.Error(), "TLS PSK shorter than 16 bytes") {
		t.Errorf("short PSK: %v", err)
	}
	if err := l.Stop(ctx); err != nil || l.Exited() != nil {
		t.Errorf("stop before start: %v", err)
	}
}
