package migrator

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/migrator/hypervisor/virtualbox"
	"github.com/vmhop/vmhop/migrator/storage"
	"golang.org/x/time/rate"
)

// The VirtualBox flow through the core, end to end, against the fake
// VBoxManage (migrator/hypervisor/virtualbox/testdata/fakevbox: exact
// arguments, VirtualBox's states) and the real chunked engine over TLS on
// loopback, moving a real image that a writer changes until the pause.

var (
	fakeVBoxOnce sync.Once
	fakeVBox     string
	fakeVBoxErr  error
)

func buildFakeVBox(t *testing.T) string {
	t.Helper()
	fakeVBoxOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fakevbox")
		if err != nil {
			fakeVBoxErr = err
			return
		}
		fakeVBox = filepath.Join(dir, "VBoxManage")
		if out, err := exec.Command("go", "build", "-o", fakeVBox, "./hypervisor/virtualbox/testdata/fakevbox").CombinedOutput(); err != nil {
			fakeVBoxErr = fmt.Errorf("build fake VBoxManage: %v: %s", err, out)
		}
	})
	if fakeVBoxErr != nil {
		t.Fatal(fakeVBoxErr)
	}
	return fakeVBox
}

// recordingDisk logs a Strategy's steps into the event log.
type recordingDisk struct {
	storage.Strategy
	ev *events
}

func (r recordingDisk) Bulk(ctx context.Context, l *rate.Limiter, p func(storage.BulkProgress)) error {
	r.ev.add("disk: bulk rounds")
	err := r.Strategy.Bulk(ctx, l, p)
	r.ev.add("disk: bulk done after %d rounds", r.Strategy.Stats().Rounds)
	return err
}

func (r recordingDisk) Final(ctx context.Context) (storage.FinalDelta, error) {
	fd, err := r.Strategy.Final(ctx)
	r.ev.add("disk: final round (proven %v)", fd.Proven)
	return fd, err
}

func (r recordingDisk) Release(ctx context.Context) error {
	r.ev.add("disk: release")
	return r.Strategy.Release(ctx)
}

func (r recordingDisk) Abort(ctx context.Context) error {
	r.ev.add("disk: abort")
	return r.Strategy.Abort(ctx)
}

type vboxWorld struct {
	*fakeWorld
	dir      string
	stopVM   chan struct{} // closes the guest's writer
	writerWG sync.WaitGroup
}

// newVBoxWorld is VM web1 registered on both fake hosts, running on
// the source with a 16 MiB image and a writer changing it.
func newVBoxWorld(t *testing.T, env ...string) *vboxWorld {
	t.Helper()
	bin := buildFakeVBox(t)
	w := &vboxWorld{fakeWorld: newWorld(t, "web1"), dir: t.TempDir(), stopVM: make(chan struct{})}
	w.dns.ev = &events{} // beside the disk phases: not in the ordered log
	for host, state := range map[string]string{"source": "running", "dest": "poweroff"} {
		b, _ := json.Marshal(map[string]any{"web1": map[string]any{"name": "web1", "state": state,
			"mac": "080027A1B2C3", "bridge": "enp3s0", "disk": map[string]string{"source": w.srcImg, "dest": w.dstImg}[host]}})
		if err := os.WriteFile(filepath.Join(w.dir, host+".json"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := make([]byte, 16<<20)
	rand.Read(img[:6<<20])
	if err := os.WriteFile(w.srcImg, img, 0o600); err != nil {
		t.Fatal(err)
	}
	runner := func(host, peer string) virtualbox.Runner {
		return func(ctx context.Context, args ...string) *exec.Cmd {
			if args[0] != "showvminfo" { // polled: its count varies
				w.ev.add("vbox %s: %s", host, strings.Join(args[:min(3, len(args))], " "))
			}
			c := exec.CommandContext(ctx, bin, args...)
			c.Env = append(os.Environ(), append([]string{"FAKEVBOX_DIR=" + w.dir, "FAKEVBOX_HOST=" + host, "FAKEVBOX_PEER=" + peer}, env...)...)
			return c
		}
	}
	// The VM as it runs: its MAC and disk from showvminfo.
	info, err := virtualbox.Info(context.Background(), runner("source", "dest"), "web1")
	if err != nil || len(info.NICs) != 1 || len(info.Disks) != 1 {
		t.Fatalf("showvminfo: %+v, %v", info, err)
	}
	if w.plan.VMMAC, err = net.ParseMAC(info.NICs[0].MAC); err != nil {
		t.Fatal(err)
	}
	w.plan.SourceDisk = info.Disks[0].Path
	w.plan.Driver = virtualbox.New(virtualbox.Config{VM: "web1", Source: runner("source", "dest"), Dest: runner("dest", "source"),
		DestHost: "192.0.2.2", Port: 6000, PasswordDir: filepath.Join(w.dir, "pw"), Poll: 10 * time.Millisecond})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var d net.Dialer
	w.plan.Disk = recordingDisk{ev: w.ev, Strategy: &storage.Chunked{Sync: &storage.ChunkedSync{
		Source:     storage.ChunkedSource{Path: w.srcImg, Chunk: storage.DigestChunk, Compress: true},
		Dest:       storage.ChunkedDest{Path: w.dstImg},
		DialSource: d.DialContext, ListenDest: net.Listen, DestWAN: addr,
		FinalDelta: 1 << 20, MaxRounds: 4, Log: discardLog(),
	}}}
	// The guest writes to its disk until it is paused.
	w.writerWG.Add(1)
	go func() {
		defer w.writerWG.Done()
		f, err := os.OpenFile(w.srcImg, os.O_WRONLY, 0)
		if err != nil {
			return
		}
		defer f.Close()
		b := make([]byte, 4096)
		for i := 0; ; i++ {
			select {
			case <-w.stopVM:
				f.Sync()
				return
			case <-time.After(2 * time.Millisecond):
			}
			rand.Read(b)
			f.WriteAt(b, int64(i%4000)*4096)
		}
	}()
	t.Cleanup(func() {
		select {
		case <-w.stopVM:
		default:
			close(w.stopVM)
		}
		w.writerWG.Wait()
	})
	return w
}

func (w *vboxWorld) vmState(t *testing.T, host string) string {
	t.Helper()
	var m map[string]struct{ State string }
	b, err := os.ReadFile(filepath.Join(w.dir, host+".json"))
	if err != nil || json.Unmarshal(b, &m) != nil {
		t.Fatalf("fake %s state: %v", host, err)
	}
	return m["web1"].State
}

// TestVirtualBoxThroughCore: teleport, disk rounds, digest and the
// switch in the order docs/architecture.md gives: the destination VM
// waits as a teleporter target, the disk is copied in live rounds while
// the guest writes, the source is paused, the hook switches the network
// and runs the final round (its digest the proof), and only then is the
// paused VM teleported. The image arrives byte for byte.
func TestVirtualBoxThroughCore(t *testing.T) {
	w := newVBoxWorld(t, "FAKEVBOX_STEP=2")
	var inHook string
	w.plan.OnSwitch = func(context.Context) error {
		inHook = w.vmState(t, "source")
		close(w.stopVM) // paused: the guest writes no more
		w.writerWG.Wait()
		return nil
	}
	rep, err := Run(context.Background(), w.plan)
	if err != nil {
		t.Fatalf("migrate: %v\nevents:\n  %s", err, strings.Join(w.ev.get(), "\n  "))
	}
	got := slices.DeleteFunc(w.ev.get(), func(s string) bool { return strings.HasPrefix(s, "disk: bulk done") })
	sameEvents(t, got, []string{
		"dest: prepare",
		"source: prepare (peer 192.0.2.2, 10.1.0.10)",
		"dest: create image",
		"vbox dest: modifyvm web1 --teleporter",
		"vbox dest: startvm web1 --type",
		"dest: attach vm (peer true)",
		"disk: bulk rounds",
		"vbox source: controlvm web1 pause",
		"source: redirect on=true",
		"disk: final round (proven true)",
		"vbox source: controlvm web1 teleport",
		"disk: release",
		"source: redirect state",
	})
	src, _ := os.ReadFile(w.srcImg)
	dst, _ := os.ReadFile(w.dstImg)
	h, err := storage.HashImage(w.srcImg)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.DigestMatch || rep.Digest != fmt.Sprintf("%x", h.Root()[:8]) || string(src) != string(dst) {
		t.Fatalf("digest %s (match %v), source image's %x; images equal: %v", rep.Digest, rep.DigestMatch, h.Root()[:8], string(src) == string(dst))
	}
	if w.plan.VMMAC.String() != "08:00:27:a1:b2:c3" || w.plan.SourceDisk != w.srcImg {
		t.Fatalf("adopted MAC %s, disk %s", w.plan.VMMAC, w.plan.SourceDisk)
	}
	if inHook != "paused" || w.vmState(t, "source") != "poweroff" || w.vmState(t, "dest") != "running" || w.src.redirect != "on" {
		t.Fatalf("source in the hook %q; after: source %q, destination %q, redirect %q", inHook, w.vmState(t, "source"), w.vmState(t, "dest"), w.src.redirect)
	}
	t.Logf("%d rounds (the last in the pause, %d chunks), %d bytes on the wire, pause %s (hook %s)",
		rep.DiskRounds, rep.VerifyChunks, rep.DiskWire, rep.Pause, rep.Runtime.Hook)
	if rep.DiskRounds < 2 || rep.Pause <= rep.Runtime.Hook {
		t.Fatalf("rounds %d, pause %s, hook %s", rep.DiskRounds, rep.Pause, rep.Runtime.Hook)
	}
	if _, err := os.Stat(filepath.Join(w.dir, "pw", "teleport.password")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("teleport password file left behind: %v", err)
	}
}

// TestVirtualBoxTeleportFailureUndone: the teleport breaks at 30%: the
// source resumes, the destination VM is powered off with teleporting off,
// its image removed, the redirect (switched on in the hook) gone.
func TestVirtualBoxTeleportFailureUndone(t *testing.T) {
	w := newVBoxWorld(t, "FAKEVBOX_STEP=1", "FAKEVBOX_FAIL=teleport")
	w.plan.OnSwitch = func(context.Context) error {
		close(w.stopVM)
		w.writerWG.Wait()
		return nil
	}
	_, err := Run(context.Background(), w.plan)
	if !errors.Is(err, hypervisor.ErrDestinationFailed) || !strings.Contains(err.Error(), "connection reset by peer") {
		t.Fatalf("err = %v", err)
	}
	ev := w.ev.get()
	i := slices.Index(ev, "vbox source: controlvm web1 teleport")
	if i < 0 {
		t.Fatalf("no teleport in %v", ev)
	}
	sameEvents(t, ev[i+1:], []string{
		"vbox source: controlvm web1 resume",
		"source: redirect on=false",
		"disk: abort",
		"vbox dest: controlvm web1 poweroff",
		"vbox dest: modifyvm web1 --teleporter",
		"dest: abort",
		"source: redirect removed",
	})
	if s, d := w.vmState(t, "source"), w.vmState(t, "dest"); s != "running" || d != "poweroff" {
		t.Fatalf("after: source %q, destination %q", s, d)
	}
	if _, err := os.Stat(w.dstImg); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("destination image left: %v", err)
	}
	if w.src.redirect != "" {
		t.Fatalf("redirect %q", w.src.redirect)
	}
}
