package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/vmhop/vmhop/migrator"
)

// incomingRecord is what this host holds for an incoming migration that
// has not landed (one per migration, by incomingKey): written durably (RecordFile) before each thing is made,
// so a vmhopd killed mid-migration and restarted removes it all
// (HostWork.RecoverIncoming) — the destination QEMU, its taps, its
// secrets, the image it created, its datapath entries — and the VM runs
// on at the source (whose undo, or recovery, resumes it there).
type incomingRecord struct {
	Name    string            `json:"name,omitempty"`
	PID     int               `json:"pid,omitempty"` // the destination QEMU
	Taps    []string          `json:"taps,omitempty"`
	PSKDir  string            `json:"psk_dir,omitempty"`
	Image   string            `json:"image,omitempty"` // created here (CreateImage)
	OldIP   netip.Addr        `json:"old_ip,omitzero"` // the VM entry (AttachVM)
	NewIP   netip.Addr        `json:"new_ip,omitzero"`
	OldIP6  netip.Addr        `json:"old_ip6,omitzero"` // its IPv6 side, if any
	NewIP6  netip.Addr        `json:"new_ip6,omitzero"`
	Tunnels []migrator.Tunnel `json:"tunnels,omitempty"`
}

func (r *incomingRecord) empty() bool {
	return r.PID == 0 && len(r.Taps) == 0 && r.PSKDir == "" && r.Image == "" && !r.OldIP.IsValid() && len(r.Tunnels) == 0
}

// RecordDir holds the records of incoming migrations, one file each
// (RecordFile).
func (w *HostWork) RecordDir() string { return filepath.Join(w.StateDir, "incoming", "records") }

// RecordFile is where the record of incoming migration key
// (incomingKey) lives.
func (w *HostWork) RecordFile(key string) string {
	return filepath.Join(w.RecordDir(), slotNameRE.ReplaceAllString(key, "_")+".json")
}

// legacyRecordFile is the one record of a vmhopd before protocol 2
// (one incoming migration at a time); recovery reads it too.
func (w *HostWork) legacyRecordFile() string {
	return filepath.Join(w.StateDir, "incoming", "current.json")
}

// record changes the record of ctx's incoming migration under w.recMu
// and writes it (temp, fsync, rename, fsync the directory) or removes it
// once empty.
func (w *HostWork) record(ctx context.Context, change func(r *incomingRecord)) error {
	key := incomingKey(ctx)
	w.recMu.Lock()
	defer w.recMu.Unlock()
	if w.recs == nil {
		w.recs = map[string]*incomingRecord{}
	}
	r := w.recs[key]
	if r == nil {
		r = &incomingRecord{}
		w.recs[key] = r
	}
	change(r)
	path := w.RecordFile(key)
	if r.empty() {
		delete(w.recs, key)
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		os.Remove(w.RecordDir()) // once the last is gone (not while others are: ENOTEMPTY)
		return nil
	}
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return writeDurable(path, b)
}

// writeDurable replaces path with b so that a crash leaves the old or the
// new content, never a mix: temp file, fsync, rename, fsync the directory.
func writeDurable(path string, b []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// RecoverIncoming removes what the incoming migrations left when the
// vmhopd that served them died before they landed or were aborted (the
// records in RecordDir, and a pre-protocol-2 legacy record), and says
// what it removed. Their ports need nothing: a vmhopd holds them in
// memory only, and the QEMUs that listened on them are killed here. Call
// it at start, before serving peers, with the datapath in place.
func (w *HostWork) RecoverIncoming(ctx context.Context) ([]string, error) {
	files, err := filepath.Glob(filepath.Join(w.RecordDir(), "*.json"))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(w.legacyRecordFile()); err == nil {
		files = append(files, w.legacyRecordFile())
	}
	var done []string
	var errs []error
	for _, f := range files {
		d, err := w.recoverRecord(ctx, f)
		done = append(done, d...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	return done, errors.Join(errs...)
}

// recoverRecord undoes the record in file and removes it.
func (w *HostWork) recoverRecord(ctx context.Context, file string) ([]string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var r incomingRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	var done []string
	var errs []error
	if r.PID > 0 && isQEMU(r.PID) {
		if err := syscall.Kill(r.PID, syscall.SIGKILL); err == nil {
			done = append(done, fmt.Sprintf("killed destination QEMU %d (%s)", r.PID, r.Name))
		}
	}
	for _, t := range r.Taps {
		if err := removeTap(t); err != nil {
			errs = append(errs, err)
		} else {
			done = append(done, "removed tap "+t)
		}
	}
	if r.PSKDir != "" {
		os.RemoveAll(r.PSKDir)
		done = append(done, "removed secrets "+r.PSKDir)
	}
	if r.OldIP.IsValid() || r.Image != "" {
		if r.Image != "" {
			w.Host.MarkCreated(r.Image) // the record has it only if CreateImage made it here
		}
		if err := w.Host.Abort(ctx, migrator.DestAbort{OldIP: r.OldIP, NewIP: r.NewIP, OldIP6: r.OldIP6, NewIP6: r.NewIP6, Image: r.Image}); err != nil {
			errs = append(errs, err)
		} else {
			done = append(done, fmt.Sprintf("removed the VM entry %s/%s and image %q", r.OldIP, r.NewIP, r.Image))
		}
	}
	for _, t := range r.Tunnels {
		if err := w.Host.RetireTunnel(ctx, t); err != nil {
			errs = append(errs, err)
		} else {
			done = append(done, "retired the tunnel to "+t.Peer.String())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return done, err
	}
	if err := os.Remove(file); err != nil {
		return done, err
	}
	os.Remove(w.RecordDir()) // once the last is gone
	return done, nil
}

// isQEMU says whether pid runs a QEMU (a recycled pid is left alone).
func isQEMU(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	argv := strings.Split(string(b), "\x00")
	return len(argv) > 0 && strings.Contains(filepath.Base(argv[0]), "qemu")
}

// recordingDest is the host's migrator.Destination as peers call it: each
// call is recorded (incomingRecord) before it acts and cleared once undone.
type recordingDest struct{ w *HostWork }

var _ migrator.Destination = recordingDest{}

func (d recordingDest) PrepareDestination(ctx context.Context, req migrator.DestPrepare) (migrator.TunnelEnd, error) {
	if err := d.w.record(ctx, func(r *incomingRecord) { r.Tunnels = append(r.Tunnels, req.Tunnel) }); err != nil {
		return migrator.TunnelEnd{}, err
	}
	return d.w.Host.PrepareDestination(ctx, req)
}

func (d recordingDest) CreateImage(ctx context.Context, req migrator.ImageCreate) error {
	if err := d.w.Host.CreateImage(ctx, req); err != nil {
		return err // refused (it exists) or not made: nothing to record
	}
	return d.w.record(ctx, func(r *incomingRecord) { r.Image = req.Path })
}

func (d recordingDest) AttachVM(ctx context.Context, req migrator.VMAttach) error {
	// Recorded while the VM is on its way here; the drain's AttachVM (the
	// VM runs here, its entry loses the tunnel) is the VM's own, not undo.
	if d.w.in.arriving(ctx) {
		if err := d.w.record(ctx, func(r *incomingRecord) {
			r.OldIP, r.NewIP, r.OldIP6, r.NewIP6 = req.OldIP, req.NewIP, req.OldIP6, req.NewIP6
		}); err != nil {
			return err
		}
	}
	return d.w.Host.AttachVM(ctx, req)
}

func (d recordingDest) HashImage(ctx context.Context, req migrator.HashRequest) (migrator.Digests, error) {
	return d.w.Host.HashImage(ctx, req)
}

func (d recordingDest) HeldAddrs(ctx context.Context, req migrator.AddrQuery) (migrator.HeldAddrs, error) {
	return d.w.Host.HeldAddrs(ctx, req)
}

func (d recordingDest) RetireTunnel(ctx context.Context, req migrator.Tunnel) error {
	if err := d.w.Host.RetireTunnel(ctx, req); err != nil {
		return err
	}
	return d.w.record(ctx, func(r *incomingRecord) {
		// By peer and token: the retiring request carries the source's
		// end of the tunnel (userspace mode), which the prepare did not.
		r.Tunnels = slices.DeleteFunc(r.Tunnels, func(t migrator.Tunnel) bool { return t.Peer == req.Peer && t.Token == req.Token })
	})
}

func (d recordingDest) Abort(ctx context.Context, req migrator.DestAbort) error {
	if err := d.w.Host.Abort(ctx, req); err != nil {
		return err
	}
	return d.w.record(ctx, func(r *incomingRecord) {
		r.Image, r.OldIP, r.NewIP, r.OldIP6, r.NewIP6 = "", netip.Addr{}, netip.Addr{}, netip.Addr{}, netip.Addr{}
	})
}
