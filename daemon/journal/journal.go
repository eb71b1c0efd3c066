// Package journal is the coordinating (source) vmhopd's record of each
// migration it runs, one JSON file per migration in state_dir/journal,
// written durably before each phase acts (migrator.Plan.OnPhase) and after
// it ends: what was done on which host that a restarted vmhopd must undo
// or finish. Rule turns a record into the recovery actions for its state
// (a pure function); Recover probes, applies them through a
// migrator.Plan and closes the record.
//
// A record's file is replaced whole on every write: written to a
// temporary file in the same directory, fsynced, renamed over the old one,
// and the directory fsynced (so a crash leaves the old record or the new
// one, never a torn one, and the rename itself survives a power cut).
package journal

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmhop/vmhop/migrator"
)

// Version is the record format's version (Record.Version).
const Version = 1

// State is where a migration stands, as its record says: what may be in
// place on each host. docs/architecture.md lists each with its recovery.
type State string

// The states, in the order a migration goes through them.
const (
	// StateStarted: the record exists; nothing was done on any host.
	StateStarted State = "started"
	// StatePreparing: the datapath phase started: the tunnel may be
	// accepted on both hosts and the old address's redirect installed
	// (off) on the source.
	StatePreparing State = "preparing"
	// StateCopying: the destination phase started: the destination image,
	// its paused hypervisor and the VM's entry may exist there; the disk
	// copy may run; DNS's TTL may be lowered. The source VM runs.
	StateCopying State = "copying"
	// StateSwitching: the memory phase started: the source may be paused,
	// the redirect on, and whether the destination resumed is not known
	// until the source hypervisor is asked.
	StateSwitching State = "switching"
	// StateCommitted: the VM runs at the destination (the memory phase
	// ended); the health check, the DNS flip and stopping the source may
	// be pending. The redirect is on.
	StateCommitted State = "committed"
	// StateKept: the health check failed: the VM resumed at the
	// destination but does not answer; the source VM is kept paused, DNS
	// unchanged, the redirect on. An operator decides (fallback or flip).
	StateKept State = "kept"
	// StateFlipped: DNS names the new address; stopping the source and the
	// drain may be pending.
	StateFlipped State = "flipped"
	// StateDraining: the drain started: the redirect stays until the old
	// address is quiet and resolvers dropped it.
	StateDraining State = "draining"
	// StateDrained: the drain ended: nothing of the migration is left in
	// the datapath.
	StateDrained State = "drained"
	// StateRolledBack: the migration failed before the commit point and
	// was undone (in the process, or by recovery): the VM runs on the source.
	StateRolledBack State = "rolled-back"
)

// Record is one migration's journal entry (state_dir/journal/ID.json).
type Record struct {
	Version int    `json:"version"`
	ID      string `json:"id"`
	Name    string `json:"name"` // the spec's name
	VM      string `json:"vm"`   // the VM's key (hypervisor:qmp-socket or virtualbox:name)
	// Spec is the migration spec's YAML as handed to vmhopd: recovery
	// rebuilds the plan from it.
	Spec    string    `json:"spec,omitempty"`
	Started time.Time `json:"started"`
	Updated time.Time `json:"updated"`
	Seq     uint64    `json:"seq"` // writes so far
	State   State     `json:"state"`
	// Phases are the phases started so far, in order.
	Phases []PhaseRecord `json:"phases"`
	// Token is the migration's tunnel token (migrator.Plan.Token).
	Token uint64 `json:"token,omitempty"`
	// VMMAC and GatewayMAC are the plan's (recovery rebuilds a plan from
	// them when the source VM is gone and cannot be adopted again).
	VMMAC      string `json:"vm_mac,omitempty"`
	GatewayMAC string `json:"gateway_mac,omitempty"`
	// DNSTTLBeforeS is the record's TTL before dns-prepare lowered it, in
	// seconds: what a rollback restores (0: not lowered or not known).
	DNSTTLBeforeS uint32 `json:"dns_ttl_before_s,omitempty"`
	// DNSCachedUntil is, after the flip, until when resolvers may hold the
	// old address: the drain keeps the redirect until then.
	DNSCachedUntil time.Time `json:"dns_cached_until,omitzero"`
	Done           Done      `json:"done"`
	// Outcome is set once the migration's job ended (or recovery closed
	// it); a record without one was left by a vmhopd that died.
	Outcome *Outcome `json:"outcome,omitempty"`
	// Recovery is what the last recovery did, if any ran.
	Recovery *Recovery `json:"recovery,omitempty"`
}

// PhaseRecord is one phase's start and end.
type PhaseRecord struct {
	Name    string    `json:"name"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended,omitzero"` // zero: did not end
	Error   string    `json:"error,omitempty"`
}

// Done is what has been done on the hosts: each flag is set before the
// step acts (it may have happened) unless it says "ended".
type Done struct {
	Datapath     bool `json:"datapath"`      // tunnels and the redirect (off) may be installed
	DNSPrepared  bool `json:"dns_prepared"`  // the TTL may be lowered
	Destination  bool `json:"destination"`   // the destination's image, hypervisor, VM entry may exist
	Switching    bool `json:"switching"`     // the memory stream started: the source may be paused, the redirect on
	Committed    bool `json:"committed"`     // the memory phase ended: the VM runs at the destination
	DiskReleased bool `json:"disk_released"` // disk-release ended without error: the disk stream is gone on both hosts
	HealthPassed bool `json:"health_passed"` // the health check ended passed
	HealthFailed bool `json:"health_failed"` // the health check ended failed: the source is kept paused
	DNSFlipped   bool `json:"dns_flipped"`   // the flip ended without error
	DNSFlipFail  bool `json:"dns_flip_failed"`
	DNSRestored  bool `json:"dns_restored"`   // the TTL restore after the flip ended
	SourceStop   bool `json:"source_stopped"` // source-cleanup ended: the source VM quit
	Draining     bool `json:"draining"`       // the drain started
	Drained      bool `json:"drained"`        // the drain ended without error
}

// Outcome is how the migration's job ended.
type Outcome struct {
	OK         bool      `json:"ok"`
	ExitCode   int       `json:"exit_code"` // migrator.ExitCode
	Error      string    `json:"error,omitempty"`
	Ended      time.Time `json:"ended"`
	DurationMS float64   `json:"duration_ms"`
	// Recovered: a restarted vmhopd closed the record (Recovery says how).
	Recovered bool `json:"recovered,omitempty"`
}

// Apply records a phase event: the phase's start or end, the facts it
// carries, and the state that follows.
func (r *Record) Apply(ev migrator.PhaseEvent, now time.Time) {
	if ev.Token != 0 {
		r.Token = ev.Token
	}
	if ev.DNSTTLBefore != 0 {
		r.DNSTTLBeforeS = ev.DNSTTLBefore
	}
	if !ev.DNSCachedUntil.IsZero() {
		r.DNSCachedUntil = ev.DNSCachedUntil
	}
	if !ev.End {
		r.Phases = append(r.Phases, PhaseRecord{Name: ev.Phase, Started: now})
		switch ev.Phase {
		case "datapath":
			r.Done.Datapath = true
		case "dns-prepare":
			r.Done.DNSPrepared = true
		case "destination":
			r.Done.Destination = true
		case "memory":
			r.Done.Switching = true
		case "drain":
			r.Done.Draining = true
		}
	} else {
		for i := len(r.Phases) - 1; i >= 0; i-- {
			if r.Phases[i].Name == ev.Phase && r.Phases[i].Ended.IsZero() {
				r.Phases[i].Ended, r.Phases[i].Error = now, ev.Err
				break
			}
		}
		ok := ev.Err == ""
		switch ev.Phase {
		case "memory":
			r.Done.Committed = ok
		case "disk-release":
			r.Done.DiskReleased = ok
		case "health":
			r.Done.HealthPassed, r.Done.HealthFailed = ok, !ok
		case "dns-flip":
			r.Done.DNSFlipped, r.Done.DNSFlipFail = ok, !ok
		case "dns-restore":
			r.Done.DNSRestored = true
		case "source-cleanup":
			r.Done.SourceStop = ok
		case "drain":
			r.Done.Drained = ok
		}
	}
	if ev.Committed {
		r.Done.Committed = true
	}
	r.State = r.Done.state(r.Outcome)
}

// state is the state the flags (and the outcome, if any) say.
func (d Done) state(o *Outcome) State {
	switch {
	case d.Drained:
		return StateDrained
	case d.Draining:
		return StateDraining
	case d.DNSFlipped:
		return StateFlipped
	case d.HealthFailed:
		return StateKept
	case d.Committed:
		return StateCommitted
	case o != nil && (d.Datapath || d.Switching):
		return StateRolledBack // the job ended before the commit point: Run undid
	case d.Switching:
		return StateSwitching
	case d.Destination || d.DNSPrepared:
		return StateCopying
	case d.Datapath:
		return StatePreparing
	}
	return StateStarted
}

// Close sets the record's outcome and the state that follows.
func (r *Record) Close(o Outcome) {
	r.Outcome = &o
	r.State = r.Done.state(r.Outcome)
}

// Open says whether the record was left without an outcome.
func (r *Record) Open() bool { return r.Outcome == nil }

// Store is a directory of records (state_dir/journal), one file per
// migration ID. Its methods are safe for concurrent use.
type Store struct {
	Dir string
	mu  sync.Mutex
	// sync is fsync; tests replace it to see a failing disk.
	sync func(*os.File) error
}

// NewStore returns the store in dir (made, mode 0700, on the first write).
func NewStore(dir string) *Store { return &Store{Dir: dir, sync: (*os.File).Sync} }

func (s *Store) path(id string) (string, error) {
	if id == "" || strings.ContainsAny(id, `/\`) || id == "." || id == ".." || strings.HasPrefix(id, ".") {
		return "", fmt.Errorf("journal: bad migration id %q", id)
	}
	return filepath.Join(s.Dir, id+".json"), nil
}

// Write replaces the record's file durably (temp file, fsync, rename,
// fsync of the directory), bumping Seq and Updated.
func (s *Store) Write(r *Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.path(r.ID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	r.Version = Version
	r.Seq++
	r.Updated = time.Now().UTC()
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("journal: encode %s: %w", r.ID, err)
	}
	f, err := os.CreateTemp(s.Dir, "."+r.ID+".*.tmp")
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(append(b, '\n'))
	if err == nil {
		err = s.sync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("journal: write %s: %w", p, err)
	}
	d, err := os.Open(s.Dir)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer d.Close()
	if err := s.sync(d); err != nil {
		return fmt.Errorf("journal: sync %s: %w", s.Dir, err)
	}
	return nil
}

// Read reads migration id's record.
func (s *Store) Read(id string) (*Record, error) {
	p, err := s.path(id)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("journal: %s: %w", p, err)
	}
	if r.Version != Version {
		return nil, fmt.Errorf("journal: %s: format version %d, this vmhopd reads %d", p, r.Version, Version)
	}
	return &r, nil
}

// List reads every record, oldest start first. A file that does not
// decode is skipped and named in the error (the others are returned).
func (s *Store) List() ([]*Record, error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	var out []*Record
	var errs []error
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || strings.HasPrefix(n, ".") || !strings.HasSuffix(n, ".json") {
			continue
		}
		r, err := s.Read(strings.TrimSuffix(n, ".json"))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b *Record) int { return a.Started.Compare(b.Started) })
	return out, errors.Join(errs...)
}

// Prune removes the oldest closed records beyond keep; open ones stay.
func (s *Store) Prune(keep int) error {
	all, err := s.List()
	var closed []*Record
	for _, r := range all {
		if !r.Open() {
			closed = append(closed, r)
		}
	}
	for len(closed) > keep {
		p, _ := s.path(closed[0].ID)
		if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
		closed = closed[1:]
	}
	return err
}
