package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/vmhop/vmhop/daemon/journal"
	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/migrator"
)

// Migrator runs one migration on the source host, for the local API's
// migrate verb: the seam the migration core fills (migrator.Run over the
// peer API to the destination's daemon). It returns the migration's report
// (anything that encodes as JSON) and its error; ctx is cancelled when
// vmhopd stops, and Migrate must then undo what it can before returning.
type Migrator interface {
	Migrate(ctx context.Context, job *Job) (report any, err error)
}

// MigratorFunc adapts a function to Migrator.
type MigratorFunc func(ctx context.Context, job *Job) (any, error)

// Migrate calls f.
func (f MigratorFunc) Migrate(ctx context.Context, job *Job) (any, error) { return f(ctx, job) }

// Job is one migration accepted by the local API.
type Job struct {
	ID     string            // unique on this host: the spec's name and 8 hex digits
	Spec   *config.Migration // the validated spec
	Caller Caller            // who asked for it, on the local socket
	Daemon *Daemon           // this host's daemon: its peers (Peer) and secrets (HandOverSecret)
	m      *migration
}

// Emit publishes a progress event to everyone following the migration
// (its Time is set if zero). Events are kept until the daemon stops, so a
// late follower sees them all.
func (j *Job) Emit(ev Event) {
	if j.m != nil {
		j.m.add(ev)
	}
}

// Event is one line of a migration's progress stream.
type Event struct {
	Time    time.Time       `json:"time"`
	Phase   string          `json:"phase,omitempty"`   // the migration's phase, in the migrator's names (e.g. "disk-bulk")
	Message string          `json:"message,omitempty"` // for people
	Data    json.RawMessage `json:"data,omitempty"`    // typed progress (e.g. hypervisor.Progress), as the migrator encodes it
	Result  *Result         `json:"result,omitempty"`  // set on the last event only
}

// Result is how a migration ended.
type Result struct {
	ID       string          `json:"id"`
	Name     string          `json:"name"` // the spec's name
	OK       bool            `json:"ok"`
	ExitCode int             `json:"exit_code"` // migrator.ExitCode of the error: what `vmhop migrate` exits with
	Error    string          `json:"error,omitempty"`
	Duration time.Duration   `json:"-"`                // encoded as duration_ms
	Report   json.RawMessage `json:"report,omitempty"` // the Migrator's report
}

type resultPlain Result

type resultJSON struct {
	resultPlain
	DurationMS float64 `json:"duration_ms"` // start to end, in milliseconds
}

// MarshalJSON encodes a result with its duration as duration_ms.
func (r Result) MarshalJSON() ([]byte, error) {
	return json.Marshal(resultJSON{resultPlain(r), float64(r.Duration.Microseconds()) / 1000})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (r *Result) UnmarshalJSON(b []byte) error {
	var j resultJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*r = Result(j.resultPlain)
	r.Duration = time.Duration(j.DurationMS * float64(time.Millisecond))
	return nil
}

// MigrationStatus is a migration as the status verb lists it.
type MigrationStatus struct {
	ID      string    `json:"id"`
	Name    string    `json:"name"`
	VM      string    `json:"vm"`
	Caller  Caller    `json:"caller"` // who started it
	State   string    `json:"state"`  // "running", "succeeded" or "failed"
	Started time.Time `json:"started"`
	Error   string    `json:"error,omitempty"`
	// Phase is the phase last started or ended (from the journal hook).
	Phase string `json:"phase,omitempty"`
	// Journal is the journal's state of the migration (journal.State).
	Journal string `json:"journal,omitempty"`
	// Progress is the last progress report of each stream, by kind
	// ("disk", "memory").
	Progress map[string]ProgressData `json:"progress,omitempty"`
	// AbortRequested: vmhop abort asked for it; the migration undoes.
	AbortRequested bool `json:"abort_requested,omitempty"`
}

// migration is a running or finished migration and its event log.
type migration struct {
	id, name, vm string
	caller       Caller
	started      time.Time
	cancel       context.CancelFunc

	mu       sync.Mutex
	events   []Event
	changed  chan struct{} // closed and replaced on every event
	result   *Result
	phase    string
	progress map[string]ProgressData
	aborted  bool

	jmu sync.Mutex      // guards jr
	jr  *journal.Record // the migration's journal record; nil before it is written
}

func (m *migration) setPhase(ph string) {
	m.mu.Lock()
	m.phase = ph
	m.mu.Unlock()
}

func (m *migration) setProgress(d ProgressData) {
	m.mu.Lock()
	if m.progress == nil {
		m.progress = map[string]ProgressData{}
	}
	m.progress[d.Kind] = d
	m.mu.Unlock()
}

// journalState is the journal's state of m ("" before it is written).
func (m *migration) journalState() journal.State {
	m.jmu.Lock()
	defer m.jmu.Unlock()
	if m.jr == nil {
		return ""
	}
	return m.jr.State
}

func (m *migration) add(ev Event) {
	if ev.Time.IsZero() {
		ev.Time = time.Now()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.result != nil {
		return // the stream has ended
	}
	m.events = append(m.events, ev)
	if ev.Result != nil {
		m.result = ev.Result
	}
	close(m.changed)
	m.changed = make(chan struct{})
}

// follow sends every event of m, from the first, until the result event
// (included) or until ctx ends.
func (m *migration) follow(ctx context.Context, send func(Event) error) error {
	for i := 0; ; {
		m.mu.Lock()
		evs, ch, done := m.events[i:], m.changed, m.result != nil
		m.mu.Unlock()
		for _, ev := range evs {
			if err := send(ev); err != nil {
				return err
			}
		}
		i += len(evs)
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return Errorf(CodeUnavailable, "progress of %q: %v", m.id, context.Cause(ctx))
		}
	}
}

func (m *migration) status() MigrationStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := MigrationStatus{ID: m.id, Name: m.name, VM: m.vm, Caller: m.caller, State: "running", Started: m.started,
		Phase: m.phase, Progress: maps.Clone(m.progress), AbortRequested: m.aborted}
	if r := m.result; r != nil {
		s.State, s.Error = "succeeded", r.Error
		if !r.OK {
			s.State = "failed"
		}
	}
	return s
}

// migrations are this host's migrations, running and recent.
type migrations struct {
	mu      sync.Mutex
	closing bool
	all     []*migration // in start order; finished ones beyond keepDone are dropped
	wg      sync.WaitGroup
}

// keepDone is how many finished migrations status keeps listing.
const keepDone = 32

// vmKey identifies the VM a spec moves: two migrations of one VM may not run together.
func vmKey(s *config.Migration) string {
	if s.VM.Hypervisor == "virtualbox" {
		return "virtualbox:" + s.VM.Name
	}
	return s.VM.Hypervisor + ":" + s.VM.QMPSocket
}

// start registers a migration of spec and runs it with run in its own
// goroutine. It refuses (CodeAlreadyExists) while a migration of the same
// VM, or of the same name, runs.
func (ms *migrations) start(spec *config.Migration, caller Caller, run func(ctx context.Context, m *migration) (any, error)) (*migration, error) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.closing {
		return nil, Errorf(CodeUnavailable, "vmhopd is stopping")
	}
	vm := vmKey(spec)
	for _, o := range ms.all {
		if o.status().State != "running" {
			continue
		}
		if o.vm == vm {
			return nil, Errorf(CodeAlreadyExists, "VM %s is being migrated by %q", vm, o.id)
		}
		if o.name == spec.Name {
			return nil, Errorf(CodeAlreadyExists, "migration %q runs already (%q)", spec.Name, o.id)
		}
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	ctx, cancel := context.WithCancel(context.Background()) // not the request's: the CLI may go away
	m := &migration{id: spec.Name + "-" + hex.EncodeToString(rnd[:]), name: spec.Name, vm: vm, caller: caller,
		started: time.Now(), cancel: cancel, changed: make(chan struct{})}
	ms.all = append(ms.all, m)
	ms.prune()
	ms.wg.Add(1)
	go func() {
		defer ms.wg.Done()
		defer cancel()
		report, err := run(ctx, m)
		res := &Result{ID: m.id, Name: m.name, OK: err == nil, ExitCode: migrator.ExitCode(err), Duration: time.Since(m.started)}
		if err != nil {
			res.Error = err.Error()
		}
		if report != nil {
			if b, jerr := json.Marshal(report); jerr == nil {
				res.Report = b
			} else {
				res.Report, _ = json.Marshal(fmt.Sprintf("report not encodable: %v", jerr))
			}
		}
		msg := "migration succeeded"
		if err != nil {
			msg = "migration failed: " + err.Error()
		}
		m.add(Event{Message: msg, Result: res})
	}()
	return m, nil
}

// prune drops the oldest finished migrations beyond keepDone.
func (ms *migrations) prune() {
	done := 0
	for _, m := range ms.all {
		if m.status().State != "running" {
			done++
		}
	}
	keep := ms.all[:0]
	for _, m := range ms.all {
		if done > keepDone && m.status().State != "running" {
			done--
			continue
		}
		keep = append(keep, m)
	}
	ms.all = keep
}

func (ms *migrations) get(id string) (*migration, error) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	for _, m := range ms.all {
		if m.id == id {
			return m, nil
		}
	}
	return nil, Errorf(CodeNotFound, "no migration %q", id)
}

func (ms *migrations) list() []MigrationStatus {
	ms.mu.Lock()
	all := slices.Clone(ms.all)
	ms.mu.Unlock()
	out := make([]MigrationStatus, 0, len(all))
	for _, m := range all {
		out = append(out, m.fullStatus())
	}
	return out
}

// fullStatus is status with the journal's state.
func (m *migration) fullStatus() MigrationStatus {
	s := m.status()
	s.Journal = string(m.journalState())
	return s
}

// abort cancels a running migration (it undoes what it did). Refused
// once it finished, and once the VM runs at the destination (the
// journal's committed states): nothing is left to undo then.
func (m *migration) abort() error {
	if m.status().State != "running" {
		return Errorf(CodeFailedPrecondition, "migration %q has ended", m.id)
	}
	switch st := m.journalState(); st {
	case journal.StateCommitted, journal.StateKept, journal.StateFlipped, journal.StateDraining, journal.StateDrained:
		return Errorf(CodeFailedPrecondition, "migration %q is past its commit point (journal: %s): the VM runs at the destination; nothing to undo", m.id, st)
	}
	m.mu.Lock()
	m.aborted = true
	m.mu.Unlock()
	m.cancel()
	return nil
}

// stop refuses new migrations, cancels the running ones and waits for
// them to return (they undo what they did) until timeout.
func (ms *migrations) stop(timeout time.Duration) bool {
	ms.mu.Lock()
	ms.closing = true
	for _, m := range ms.all {
		m.cancel()
	}
	ms.mu.Unlock()
	done := make(chan struct{})
	go func() { ms.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}
