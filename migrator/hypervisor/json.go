package hypervisor

import (
	"encoding/json"
	"time"
)

// Progress and Result encode to JSON with stable snake_case names and
// their units in the name: durations as float milliseconds (_ms), sizes
// and rates in bytes (_bytes, _bytes_per_s), the throughput in bits per
// second (_bits_per_s).

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func fromMS(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }

type progressJSON struct {
	Status             string  `json:"status"`
	ElapsedMS          float64 `json:"elapsed_ms"`
	TransferredBytes   uint64  `json:"transferred_bytes"`
	RemainingBytes     uint64  `json:"remaining_bytes"`
	TotalBytes         uint64  `json:"total_bytes"`
	DirtyBytesPerS     uint64  `json:"dirty_bytes_per_s"`
	Iteration          uint64  `json:"iteration"`
	ThroughputBitsPerS float64 `json:"throughput_bits_per_s"`
	ExpectedDowntimeMS float64 `json:"expected_downtime_ms"`
	ThrottlePercent    int     `json:"throttle_percent"`
}

// MarshalJSON encodes a progress report (elapsed_ms, transferred_bytes, ...).
func (p Progress) MarshalJSON() ([]byte, error) {
	return json.Marshal(progressJSON{Status: p.Status, ElapsedMS: ms(p.Elapsed), TransferredBytes: p.Transferred,
		RemainingBytes: p.Remaining, TotalBytes: p.Total, DirtyBytesPerS: p.DirtyRate, Iteration: p.Iteration,
		ThroughputBitsPerS: p.Throughput, ExpectedDowntimeMS: ms(p.ExpectedDowntime), ThrottlePercent: p.Throttle})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (p *Progress) UnmarshalJSON(b []byte) error {
	var j progressJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*p = Progress{Status: j.Status, Elapsed: fromMS(j.ElapsedMS), Transferred: j.TransferredBytes,
		Remaining: j.RemainingBytes, Total: j.TotalBytes, DirtyRate: j.DirtyBytesPerS, Iteration: j.Iteration,
		Throughput: j.ThroughputBitsPerS, ExpectedDowntime: fromMS(j.ExpectedDowntimeMS), Throttle: j.ThrottlePercent}
	return nil
}

type resultJSON struct {
	TotalMS          float64   `json:"total_ms"`
	DowntimeMS       float64   `json:"downtime_ms"`
	HookMS           float64   `json:"hook_ms"`
	HookAt           time.Time `json:"hook_at"`
	HookLagMS        float64   `json:"hook_lag_ms"`
	TransferredBytes uint64    `json:"transferred_bytes"`
	Iterations       uint64    `json:"iterations"`
}

// MarshalJSON encodes a result (total_ms, downtime_ms, transferred_bytes, ...).
func (r Result) MarshalJSON() ([]byte, error) {
	return json.Marshal(resultJSON{TotalMS: ms(r.Total), DowntimeMS: ms(r.Downtime), HookMS: ms(r.Hook), HookAt: r.HookAt,
		HookLagMS: ms(r.HookLag), TransferredBytes: r.Transferred, Iterations: r.Iterations})
}

// UnmarshalJSON decodes what MarshalJSON encodes.
func (r *Result) UnmarshalJSON(b []byte) error {
	var j resultJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*r = Result{Total: fromMS(j.TotalMS), Downtime: fromMS(j.DowntimeMS), Hook: fromMS(j.HookMS), HookAt: j.HookAt,
		HookLag: fromMS(j.HookLagMS), Transferred: j.TransferredBytes, Iterations: j.Iterations}
	return nil
}
