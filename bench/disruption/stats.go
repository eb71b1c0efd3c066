package main

import (
	"math"
	"sort"
)

// Stat is a metric over a mode's runs.
type Stat struct {
	N      int     `json:"n"`
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	Max    float64 `json:"max"`
}

// Summarize is min, median (the mean of the middle two for an even
// count) and max of values; NaNs (not measured) are left out. N is 0
// when nothing is left.
func Summarize(values []float64) Stat {
	var v []float64
	for _, x := range values {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return Stat{}
	}
	sort.Float64s(v)
	n := len(v)
	med := v[n/2]
	if n%2 == 0 {
		med = (v[n/2-1] + v[n/2]) / 2
	}
	return Stat{N: n, Min: v[0], Median: med, Max: v[n-1]}
}

// Aggregate summarizes each metric over the runs that succeeded (a run
// with an error counts in none; a metric a run did not measure is left
// out of that metric only).
func Aggregate(runs []RunResult) map[string]Stat {
	out := map[string]Stat{}
	for _, m := range metrics {
		var v []float64
		for _, r := range runs {
			if r.Err != "" {
				continue
			}
			x, ok := r.Metrics[m.Name]
			if !ok {
				x = math.NaN()
			}
			v = append(v, x)
		}
		if s := Summarize(v); s.N > 0 {
			out[m.Name] = s
		}
	}
	return out
}

// Ratios is num's median over den's, metric by metric, where both were
// measured and den's median is not 0.
func Ratios(num, den map[string]Stat) map[string]float64 {
	out := map[string]float64{}
	for k, a := range num {
		if b, ok := den[k]; ok && b.Median != 0 {
			out[k] = a.Median / b.Median
		}
	}
	return out
}
