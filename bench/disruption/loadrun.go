package main

import (
	"context"
	"time"

	"github.com/vmhop/vmhop/internal/config"
	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/labrun"
)

// loadRun is the scenario's client load against the lab's guest with the
// client's packet capture around it, for the runs the benchmark drives
// itself (freeze-and-copy, control); the live modes get theirs from
// labrun.
type loadRun struct {
	Load *labrun.Load
	Pcap string // the capture's file, in the lab
	cap  *labrun.Capture
	stop context.CancelFunc
	done chan struct{}
}

// startLoad starts the capture and the load, and returns after a
// second's lead-in (the probes' connections up, the round trips before
// the move measured). End must be called, also on error paths.
func startLoad(ctx context.Context, l *lab.Lab, vm *lab.VM, spec *config.Migration, sc *scenario) (*loadRun, error) {
	r := &loadRun{Pcap: l.Path("client.pcap"), done: make(chan struct{})}
	var err error
	if r.cap, err = labrun.StartCaptureFilter(l, r.Pcap, captureFilter); err != nil {
		return nil, err
	}
	r.Load = sc.load(l, vm.IP, spec)
	var lctx context.Context
	lctx, r.stop = context.WithCancel(ctx)
	go func() { r.Load.Run(lctx); close(r.done) }()
	time.Sleep(time.Second)
	return r, nil
}

// End stops the load and the capture (once; later calls return the
// zero view) and returns what the client saw, with the echo replies
// from the capture.
func (r *loadRun) End() (labrun.ClientView, error) {
	if r.stop == nil {
		return labrun.ClientView{}, nil
	}
	r.stop()
	r.stop = nil
	<-r.done
	byPort, _, err := r.cap.StopByPort(labrun.EchoPort)
	return r.Load.View(byPort), err
}
