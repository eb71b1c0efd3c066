package migrator

import (
	"encoding/json"
	"time"

	"github.com/vmhop/vmhop/migrator/hypervisor"
	"github.com/vmhop/vmhop/proxy/datapath"
	"github.com/vmhop/vmhop/proxy/ddns"
)

// Reports and phases encode to JSON with stable snake_case names and
// their units in the name: durations as float milliseconds (_ms), sizes
// as bytes (_bytes). `vmhop migrate --json` and the local API's result
// carry them as they are; docs/architecture.md lists the fields.

// ms is d in milliseconds, to the microsecond.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

type phaseJSON struct {
	Name       string  `json:"name"`
	DurationMS float64 `json:"duration_ms"`
	Error      string  `json:"error,omitempty"`
}

// MarshalJSON encodes a phase as {"name", "duration_ms", "error"}.
func (p Phase) MarshalJSON() ([]byte, error) {
	return json.Marshal(phaseJSON{Name: p.Name, DurationMS: ms(p.Duration), Error: p.Err})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (p *Phase) UnmarshalJSON(b []byte) error {
	var j phaseJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*p = Phase{Name: j.Name, Duration: time.Duration(j.DurationMS * float64(time.Millisecond)), Err: j.Error}
	return nil
}

type reportJSON struct {
	Phases          []Phase           `json:"phases"`
	Runtime         hypervisor.Result `json:"runtime"`
	DiskStrategy    string            `json:"disk_strategy"`
	DiskBytes       uint64            `json:"disk_bytes"`
	DiskWireBytes   int64             `json:"disk_wire_bytes"`
	DiskRounds      int               `json:"disk_rounds"`
	DiskCuts        int               `json:"disk_cuts"`
	DigestMatch     bool              `json:"digest_match"`
	Digest          string            `json:"digest"`
	DigestReadBytes int64             `json:"digest_read_bytes"`
	VerifyReadBytes int64             `json:"verify_read_bytes"`
	VerifyChunks    int               `json:"verify_chunks"`
	PauseMS         float64           `json:"pause_ms"`
	TotalMS         float64           `json:"total_ms"`
	Redirected      datapath.Counters `json:"redirected"`
	DNSBefore       []ddns.Record     `json:"dns_before"`
	DNSAfter        []ddns.Record     `json:"dns_after"`
	DNSWaitMS       float64           `json:"dns_wait_ms"`
	DNSCachedForMS  float64           `json:"dns_cached_for_ms"`
	Health          string            `json:"health"`
	Warnings        []string          `json:"warnings,omitempty"`
	SourceKept      bool              `json:"source_kept"`
}

// MarshalJSON encodes a report with snake_case names and explicit units
// (pause_ms, disk_wire_bytes, ...).
func (r Report) MarshalJSON() ([]byte, error) {
	return json.Marshal(reportJSON{Phases: r.Phases, Runtime: r.Runtime, DiskStrategy: r.DiskStrategy,
		DiskBytes: r.DiskBytes, DiskWireBytes: r.DiskWire, DiskRounds: r.DiskRounds, DiskCuts: r.DiskCuts,
		DigestMatch: r.DigestMatch, Digest: r.Digest, DigestReadBytes: r.DigestRead, VerifyReadBytes: r.VerifyRead,
		VerifyChunks: r.VerifyChunks, PauseMS: ms(r.Pause), TotalMS: ms(r.Total), Redirected: r.Redirected,
		DNSBefore: r.DNSBefore, DNSAfter: r.DNSAfter, DNSWaitMS: ms(r.DNSWait), DNSCachedForMS: ms(r.DNSCachedFor),
		Health: r.Health, Warnings: r.Warnings, SourceKept: r.SourceKept})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (r *Report) UnmarshalJSON(b []byte) error {
	var j reportJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	d := func(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }
	*r = Report{Phases: j.Phases, Runtime: j.Runtime, DiskStrategy: j.DiskStrategy, DiskBytes: j.DiskBytes,
		DiskWire: j.DiskWireBytes, DiskRounds: j.DiskRounds, DiskCuts: j.DiskCuts, DigestMatch: j.DigestMatch,
		Digest: j.Digest, DigestRead: j.DigestReadBytes, VerifyRead: j.VerifyReadBytes, VerifyChunks: j.VerifyChunks,
		Pause: d(j.PauseMS), Total: d(j.TotalMS), Redirected: j.Redirected, DNSBefore: j.DNSBefore, DNSAfter: j.DNSAfter,
		DNSWait: d(j.DNSWaitMS), DNSCachedFor: d(j.DNSCachedForMS), Health: j.Health, Warnings: j.Warnings,
		SourceKept: j.SourceKept}
	return nil
}

type preflightJSON struct {
	DNSWaitMS      float64 `json:"dns_wait_ms"`
	DNSCachedForMS float64 `json:"dns_cached_for_ms"`
}

// MarshalJSON encodes the preflight's findings (dns_wait_ms, dns_cached_for_ms).
func (p Preflight) MarshalJSON() ([]byte, error) {
	return json.Marshal(preflightJSON{DNSWaitMS: ms(p.DNSWait), DNSCachedForMS: ms(p.DNSCachedFor)})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (p *Preflight) UnmarshalJSON(b []byte) error {
	var j preflightJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	d := func(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }
	*p = Preflight{DNSWait: d(j.DNSWaitMS), DNSCachedFor: d(j.DNSCachedForMS)}
	return nil
}
