package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/vmhop/vmhop/daemon"
)

// isTerminal says whether w is a terminal (the live display goes there;
// anything else gets plain lines).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// liveView draws a migration's progress events on a terminal: one bar
// for the stream running (the disk's bulk copy, then the memory stream)
// with its bytes, rate and ETA, the disk round or memory pass in its
// description; phase changes and the result as lines above it.
type liveView struct {
	w     io.Writer
	width int // bar width in characters (0: the library's default)
	bar   *progressbar.ProgressBar
	kind  string
	phase string
}

func newLiveView(w io.Writer) *liveView { return &liveView{w: w} }

// event draws one event.
func (v *liveView) event(ev daemon.Event) {
	if len(ev.Data) > 0 {
		var d daemon.ProgressData
		if json.Unmarshal(ev.Data, &d) == nil && d.Kind != "" {
			v.progress(ev.Phase, d)
			return
		}
	}
	v.finish()
	if ev.Phase != "" {
		v.phase = ev.Phase
	}
	printEvent(v.w, ev)
}

// progress moves the bar, making a new one when the stream changes.
func (v *liveView) progress(phase string, d daemon.ProgressData) {
	if v.bar == nil || v.kind != d.Kind {
		v.finish()
		v.kind = d.Kind
		opts := []progressbar.Option{
			progressbar.OptionSetWriter(v.w),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowCount(),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetPredictTime(false), // the daemon's ETA is in the description
			// No throttle: vmhopd sends at most two progress events a second per stream.
		}
		if v.width > 0 {
			opts = append(opts, progressbar.OptionSetWidth(v.width))
		} else {
			opts = append(opts, progressbar.OptionFullWidth())
		}
		v.bar = progressbar.NewOptions64(int64(max(d.TotalBytes, 1)), opts...)
	}
	total := max(d.TotalBytes, d.DoneBytes, 1)
	if int64(total) != v.bar.GetMax64() {
		v.bar.ChangeMax64(int64(total))
	}
	v.bar.Describe(describe(phase, d))
	v.bar.Set64(int64(d.DoneBytes))
}

// describe is the bar's label: the stream, its round or pass, its rate
// and what the daemon expects is left of it.
func describe(phase string, d daemon.ProgressData) string {
	var s string
	switch d.Kind {
	case "disk":
		s = "disk"
		if d.Round > 0 {
			s += fmt.Sprintf(" round %d", d.Round)
		}
	case "memory":
		s = fmt.Sprintf("memory pass %d", d.Pass)
		if d.RemainingBytes > 0 {
			s += fmt.Sprintf(", %s left", mib(d.RemainingBytes))
		}
	default:
		s = phase
	}
	s += fmt.Sprintf(", %.1f Mbit/s", d.RateBitsPerS/1e6)
	if d.ETAMS > 0 {
		s += ", ETA " + (time.Duration(d.ETAMS) * time.Millisecond).Round(time.Second).String()
	}
	return s
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// finish ends the current bar as it stands (not filled: a stream that
// stopped short shows where), on its own line.
func (v *liveView) finish() {
	if v.bar == nil {
		return
	}
	v.bar.Exit()
	fmt.Fprintln(v.w)
	v.bar, v.kind = nil, ""
}

// plainProgress is a progress event as one line for a log or a pipe.
func plainProgress(d daemon.ProgressData) string {
	s := fmt.Sprintf("%s/%s", mib(d.DoneBytes), mib(d.TotalBytes))
	return describe("", d) + ": " + s
}
