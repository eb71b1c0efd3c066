package main

import (
	"context"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
)

// control runs the load against the lab's guest at site A for the
// scenario's ControlWindow and moves nothing: the same lab, load and
// capture as the moves (the load starts a second before the window and
// runs 3 s past it, as around a live move), so its reply gaps are the
// guest's own floor (its single TCG vCPU on a shared host), what no mode
// can go below. It returns the run and the pcap's path (in the lab).
func control(ctx context.Context, l *lab.Lab, vm *lab.VM, spec *config.Migration, sc *scenario) (runData, string, error) {
	d := runData{NoMove: true}
	lr, err := startLoad(ctx, l, vm, spec, sc)
	if err != nil {
		return d, "", err
	}
	defer lr.End()
	pcap := lr.Pcap

	t0 := time.Now()
	select {
	case <-ctx.Done():
		return d, pcap, ctx.Err()
	case <-time.After(sc.ControlWindow):
	}
	t1 := time.Now()
	time.Sleep(3 * time.Second)
	var cerr error
	d.View, cerr = lr.End()
	// The window is Start to Stopped: the round trips "during the copy"
	// (rttMetrics) are the window's, with nothing moving.
	d.Start, d.Stopped = t0, t1
	d.Phases = []labrun.Span{{Name: "no move", From: t0, To: t1}}
	return d, pcap, cerr
}
