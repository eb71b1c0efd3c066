package daemon

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/storage"
)

// TestRecoverIncomingRemovesWhatADeadDaemonLeft: a destination vmhopd
// that dies mid-migration leaves a record; the next one, at start,
// kills the destination QEMU, removes the image it created and its
// secrets, and the record. An image it did not create is never touched.
func TestRecoverIncomingRemovesWhatADeadDaemonLeft(t *testing.T) {
	dir := t.TempDir()
	ctx := asPeer(context.Background(), "site-a", "m1")
	ctx2 := asPeer(context.Background(), "site-a", "m2") // a second migration at the same time
	w := &HostWork{Host: &migrator.Host{Name: "site-b"}, Disks: &storage.LocalDiskServer{}, StateDir: dir}
	w.Register(&PeerAPI{methods: map[string]http.HandlerFunc{}})
	dest := recordingDest{w}

	img := filepath.Join(dir, "web1.raw")
	if err := dest.CreateImage(ctx, migrator.ImageCreate{Path: img, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other.raw")
	os.WriteFile(other, []byte("a VM living here"), 0o600)
	if err := dest.CreateImage(ctx, migrator.ImageCreate{Path: other, Size: 1 << 20}); err == nil {
		t.Fatal("an existing image was not refused")
	}
	// A "QEMU" (sleep under a qemu name), as the launcher would record it.
	qemu := filepath.Join(dir, "qemu-system-x86_64")
	if err := os.Symlink("/bin/sleep", qemu); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(qemu, "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	psk := filepath.Join(dir, "incoming", "web1")
	os.MkdirAll(psk, 0o700)
	os.WriteFile(filepath.Join(psk, "keys.psk"), []byte("vmhop:00"), 0o600)
	if err := w.record(ctx, func(r *incomingRecord) { r.Name, r.PID, r.PSKDir = "web1", cmd.Process.Pid, psk }); err != nil {
		t.Fatal(err)
	}
	img2 := filepath.Join(dir, "web2.raw")
	if err := dest.CreateImage(ctx2, migrator.ImageCreate{Path: img2, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	var rec incomingRecord
	b, err := os.ReadFile(w.RecordFile(incomingKey(ctx)))
	if err != nil || json.Unmarshal(b, &rec) != nil || rec.Image != img || rec.PID != cmd.Process.Pid {
		t.Fatalf("record %s (%v), want image %s and pid %d", b, err, img, cmd.Process.Pid)
	}

	// The daemon dies here; a new one starts on the same state_dir.
	w2 := &HostWork{Host: &migrator.Host{Name: "site-b"}, Disks: &storage.LocalDiskServer{}, StateDir: dir}
	undone, err := w2.RecoverIncoming(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("undone: %q", undone)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Error("the destination QEMU was not killed")
	}
	for _, gone := range []string{img, psk, w.RecordFile(incomingKey(ctx)), img2, w.RecordFile(incomingKey(ctx2))} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s left: %v", gone, err)
		}
	}
	if b, err := os.ReadFile(other); err != nil || string(b) != "a VM living here" {
		t.Errorf("an image the migration did not create was touched: %q %v", b, err)
	}
	if again, err := w2.RecoverIncoming(ctx); err != nil || len(again) != 0 {
		t.Errorf("second recovery: %q %v", again, err)
	}
}

// TestRecordClearsAsUndone: the record shrinks as the source undoes, and
// is gone once nothing is left.
func TestRecordClearsAsUndone(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	w := &HostWork{Host: &migrator.Host{Name: "site-b"}, Disks: &storage.LocalDiskServer{}, StateDir: dir}
	w.Register(&PeerAPI{methods: map[string]http.HandlerFunc{}})
	dest := recordingDest{w}
	img := filepath.Join(dir, "web1.raw")
	if err := dest.CreateImage(ctx, migrator.ImageCreate{Path: img, Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := dest.Abort(ctx, migrator.DestAbort{Image: img}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(w.RecordFile(incomingKey(ctx))); !os.IsNotExist(err) {
		t.Errorf("record left after abort: %v", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Errorf("image left after abort: %v", err)
	}
}

// TestScopeUnderSystemd: under systemd a destination QEMU starts in a
// scope of its own, out of vmhopd's control group; elsewhere as is.
func TestScopeUnderSystemd(t *testing.T) {
	t.Setenv("INVOCATION_ID", "")
	if p, a := scopeArgs("web1@site-b", "qemu-system-x86_64", []string{"-m", "1G"}); p != "qemu-system-x86_64" || len(a) != 2 {
		t.Errorf("without systemd: %s %q", p, a)
	}
	t.Setenv("INVOCATION_ID", "0123")
	p, a := scopeArgs("web1@site-b", "qemu-system-x86_64", []string{"-m", "1G"})
	want := []string{"--scope", "--quiet", "--collect", "--unit=vmhop-vm-web1_site-b", "--", "qemu-system-x86_64", "-m", "1G"}
	if p != "systemd-run" || !slices.Equal(a, want) {
		t.Errorf("under systemd: %s %q, want systemd-run %q", p, a, want)
	}
}

// TestRecordsPerMigration: two incoming migrations at once each have
// their own record; clearing one leaves the other, and the records'
// directory goes with the last.
func TestRecordsPerMigration(t *testing.T) {
	dir := t.TempDir()
	w := &HostWork{Host: &migrator.Host{Name: "site-b"}, Disks: &storage.LocalDiskServer{}, StateDir: dir}
	w.Register(&PeerAPI{methods: map[string]http.HandlerFunc{}})
	m1, m2 := asPeer(context.Background(), "site-a", "m1"), asPeer(context.Background(), "site-a", "m2")
	for _, c := range []struct {
		ctx  context.Context
		name string
	}{{m1, "web1"}, {m2, "web2"}} {
		if err := w.record(c.ctx, func(r *incomingRecord) { r.Name, r.Taps = c.name, []string{"tap-" + c.name} }); err != nil {
			t.Fatal(err)
		}
	}
	var r2 incomingRecord
	if b, err := os.ReadFile(w.RecordFile(incomingKey(m2))); err != nil || json.Unmarshal(b, &r2) != nil || r2.Name != "web2" {
		t.Fatalf("m2's record: %+v %v", r2, err)
	}
	w.record(m1, func(r *incomingRecord) { *r = incomingRecord{} })
	if _, err := os.Stat(w.RecordFile(incomingKey(m1))); !os.IsNotExist(err) {
		t.Errorf("m1's record left: %v", err)
	}
	if _, err := os.Stat(w.RecordFile(incomingKey(m2))); err != nil {
		t.Errorf("m2's record went with m1's: %v", err)
	}
	w.record(m2, func(r *incomingRecord) { *r = incomingRecord{} })
	if _, err := os.Stat(w.RecordDir()); !os.IsNotExist(err) {
		t.Errorf("records directory left: %v", err)
	}
}
