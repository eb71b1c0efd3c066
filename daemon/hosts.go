package daemon

import (
	"context"
	"encoding/json"
	"slices"
	"sync"

	"github.com/vmhop/vmhop/migrator"
	"github.com/vmhop/vmhop/migrator/hypervisor/qemu"
	"github.com/vmhop/vmhop/migrator/storage"
)

// The migration core's destination host over the peer API: the
// destination's vmhopd serves migrator.Destination and
// storage.DiskServer method by method (ServeDestination, ServeDiskServer);
// the source's vmhopd implements them with calls (RemoteDestination,
// RemoteDiskServer). The per-migration storage.Identity crosses inside
// the requests, over the peers' mutual TLS.

// Peer methods of the destination host.
const (
	MethodDestPrepare     = "dest.prepare"
	MethodDestCreateImage = "dest.create-image"
	MethodDestAttachVM    = "dest.attach-vm"
	MethodDestHashImage   = "dest.hash-image"
	MethodDestAbort       = "dest.abort"
	MethodDestHeldAddrs   = "dest.held-addrs"
	MethodDestRetire      = "dest.retire-tunnel"
	MethodServeChunked    = "disk.serve-chunked"
	MethodStopChunked     = "disk.stop-chunked"
	MethodServeRelay      = "disk.serve-relay"
	MethodStopRelay       = "disk.stop-relay"
	MethodChunkedError    = "disk.chunked-error"
)

func init() {
	RegisterError("image_exists", CodeAlreadyExists, migrator.ErrImageExists)
	RegisterError("migration_in_progress", CodeAlreadyExists, migrator.ErrInProgress)
	RegisterError("no_space", CodeFailedPrecondition, storage.ErrNoSpace)
}

// handle registers a method whose handler returns only an error.
func handle[Req any](a *PeerAPI, method string, fn func(context.Context, Req) error) {
	Handle(a, method, func(ctx context.Context, _ string, req Req) (Empty, error) {
		return Empty{}, fn(ctx, req)
	})
}

// handleLeased registers a method whose handler returns only an error;
// once it succeeded, lease changes the calling peer's lease (lease.go).
// lease also gets the call's migration ID (Vmhop-Migration).
func handleLeased[Req any](a *PeerAPI, method string, fn func(context.Context, Req) error, lease func(l *Lease, mig string, req Req)) {
	Handle(a, method, func(ctx context.Context, from string, req Req) (Empty, error) {
		if err := fn(ctx, req); err != nil {
			return Empty{}, err
		}
		a.leases.track(from, func(l *Lease) { lease(l, migrationID(ctx), req) })
		return Empty{}, nil
	})
}

// ServeDestination registers dest's methods on a (before Serve). What
// they make is held in the calling peer's lease: undone through dest if
// the peer vanishes before the VM runs here.
func ServeDestination(a *PeerAPI, dest migrator.Destination) {
	a.mu.Lock()
	a.dest = dest
	a.mu.Unlock()
	Handle(a, MethodDestPrepare, func(ctx context.Context, from string, req migrator.DestPrepare) (migrator.TunnelEnd, error) {
		end, err := dest.PrepareDestination(ctx, req)
		if err != nil {
			return end, err
		}
		a.leases.track(from, func(l *Lease) { l.Tunnels = append(l.Tunnels, req.Tunnel) })
		return end, nil
	})
	handleLeased(a, MethodDestCreateImage, dest.CreateImage, func(l *Lease, _ string, req migrator.ImageCreate) {
		l.Images = append(l.Images, req.Path)
	})
	handleLeased(a, MethodDestAttachVM, dest.AttachVM, func(l *Lease, _ string, req migrator.VMAttach) {
		l.VMs = slices.DeleteFunc(l.VMs, func(v migrator.VMAttach) bool { return v.OldIP == req.OldIP })
		l.VMs = append(l.VMs, req)
	})
	handleLeased(a, MethodDestAbort, dest.Abort, func(l *Lease, _ string, req migrator.DestAbort) {
		l.VMs = slices.DeleteFunc(l.VMs, func(v migrator.VMAttach) bool { return v.OldIP == req.OldIP })
		if !req.KeepImage {
			l.Images = slices.DeleteFunc(l.Images, func(p string) bool { return p == req.Image })
		}
	})
	handleLeased(a, MethodDestRetire, dest.RetireTunnel, func(l *Lease, _ string, req migrator.Tunnel) {
		l.Tunnels = slices.DeleteFunc(l.Tunnels, func(t migrator.Tunnel) bool { return t.Peer == req.Peer && t.Token == req.Token })
	})
	Handle(a, MethodDestHashImage, func(ctx context.Context, _ string, req migrator.HashRequest) (migrator.Digests, error) {
		return dest.HashImage(ctx, req)
	})
	Handle(a, MethodDestHeldAddrs, func(ctx context.Context, _ string, req migrator.AddrQuery) (migrator.HeldAddrs, error) {
		return dest.HeldAddrs(ctx, req)
	})
}

// RemoteDestination is migrator.Destination on the peer behind Peer.
type RemoteDestination struct{ Peer *PeerClient }

var _ migrator.Destination = RemoteDestination{}

func call[Req any](ctx context.Context, c *PeerClient, method string, req Req) error {
	_, err := Call[Req, Empty](ctx, c, method, req)
	return err
}

// PrepareDestination implements migrator.Destination.
func (r RemoteDestination) PrepareDestination(ctx context.Context, req migrator.DestPrepare) (migrator.TunnelEnd, error) {
	return Call[migrator.DestPrepare, migrator.TunnelEnd](ctx, r.Peer, MethodDestPrepare, req)
}

// CreateImage implements migrator.Destination.
func (r RemoteDestination) CreateImage(ctx context.Context, req migrator.ImageCreate) error {
	return call(ctx, r.Peer, MethodDestCreateImage, req)
}

// AttachVM implements migrator.Destination.
func (r RemoteDestination) AttachVM(ctx context.Context, req migrator.VMAttach) error {
	return call(ctx, r.Peer, MethodDestAttachVM, req)
}

// HashImage implements migrator.Destination.
func (r RemoteDestination) HashImage(ctx context.Context, req migrator.HashRequest) (migrator.Digests, error) {
	return Call[migrator.HashRequest, migrator.Digests](ctx, r.Peer, MethodDestHashImage, req)
}

// HeldAddrs implements migrator.Destination.
func (r RemoteDestination) HeldAddrs(ctx context.Context, req migrator.AddrQuery) (migrator.HeldAddrs, error) {
	return Call[migrator.AddrQuery, migrator.HeldAddrs](ctx, r.Peer, MethodDestHeldAddrs, req)
}

// RetireTunnel implements migrator.Destination.
func (r RemoteDestination) RetireTunnel(ctx context.Context, req migrator.Tunnel) error {
	return call(ctx, r.Peer, MethodDestRetire, req)
}

// Abort implements migrator.Destination.
func (r RemoteDestination) Abort(ctx context.Context, req migrator.DestAbort) error {
	return call(ctx, r.Peer, MethodDestAbort, req)
}

// ServeDiskServer registers ds's methods on a (before Serve).
func ServeDiskServer(a *PeerAPI, ds storage.DiskServer) {
	handle(a, MethodServeChunked, ds.ServeChunked)
	handle(a, MethodStopChunked, ds.StopChunked)
	handle(a, MethodServeRelay, ds.ServeRelay)
	handle(a, MethodStopRelay, ds.StopRelay)
	if rep, ok := ds.(storage.RoundErrorReporter); ok {
		Handle(a, MethodChunkedError, func(ctx context.Context, _ string, req storage.ChunkedStop) (storage.RoundError, error) {
			return rep.ChunkedError(ctx, req)
		})
	}
}

// RemoteDiskServer is storage.DiskServer on the peer behind Peer.
type RemoteDiskServer struct{ Peer *PeerClient }

var _ storage.DiskServer = RemoteDiskServer{}

// ServeChunked implements storage.DiskServer.
func (r RemoteDiskServer) ServeChunked(ctx context.Context, req storage.ChunkedServe) error {
	return call(ctx, r.Peer, MethodServeChunked, req)
}

// StopChunked implements storage.DiskServer.
func (r RemoteDiskServer) StopChunked(ctx context.Context, req storage.ChunkedStop) error {
	return call(ctx, r.Peer, MethodStopChunked, req)
}

// ServeRelay implements storage.DiskServer.
func (r RemoteDiskServer) ServeRelay(ctx context.Context, req storage.RelayServe) error {
	return call(ctx, r.Peer, MethodServeRelay, req)
}

// ChunkedError implements storage.RoundErrorReporter; the error names
// the peer (the destination host).
func (r RemoteDiskServer) ChunkedError(ctx context.Context, req storage.ChunkedStop) (storage.RoundError, error) {
	re, err := Call[storage.ChunkedStop, storage.RoundError](ctx, r.Peer, MethodChunkedError, req)
	if re.Error != "" {
		re.Error = r.Peer.Name + ": " + re.Error
	}
	return re, err
}

var _ storage.RoundErrorReporter = RemoteDiskServer{}

// StopRelay implements storage.DiskServer.
func (r RemoteDiskServer) StopRelay(ctx context.Context, req storage.RelayStop) error {
	return call(ctx, r.Peer, MethodStopRelay, req)
}

// Peer methods of the QEMU driver's destination half (qemu.Incoming).
const (
	MethodQEMUStart        = "qemu.start"
	MethodQEMUQuery        = "qemu.query"
	MethodQEMUExportDisk   = "qemu.export-disk"
	MethodQEMUUnexportDisk = "qemu.unexport-disk"
	MethodQEMUWaitRunning  = "qemu.wait-running"
	MethodQEMUStop         = "qemu.stop"
	MethodQEMUWatch        = "qemu.watch" // stream: one event when QEMU exits
)

// QEMUExit is qemu.watch's event: the destination QEMU exited.
type QEMUExit struct {
	Exited bool `json:"exited"`
}

// ServeIncoming registers in's methods on a (before Serve). qemu.watch
// streams until the destination QEMU exits (one QEMUExit) or the caller
// goes.
func ServeIncoming(a *PeerAPI, in qemu.Incoming) {
	a.mu.Lock()
	a.in = in
	a.mu.Unlock()
	handleLeased(a, MethodQEMUStart, in.Start, func(l *Lease, mig string, _ qemu.IncomingStart) {
		if !slices.Contains(l.Incoming, mig) {
			l.Incoming = append(l.Incoming, mig)
		}
		l.Committed = slices.DeleteFunc(l.Committed, func(s string) bool { return s == mig })
	})
	handle(a, MethodQEMUExportDisk, in.ExportDisk)
	// Once the guest runs here, a vanished source leaves it running.
	handleLeased(a, MethodQEMUWaitRunning, in.WaitRunning, func(l *Lease, mig string, _ qemu.RunningWait) {
		if !slices.Contains(l.Committed, mig) {
			l.Committed = append(l.Committed, mig)
		}
	})
	handle(a, MethodQEMUUnexportDisk, func(ctx context.Context, _ Empty) error { return in.UnexportDisk(ctx) })
	handleLeased(a, MethodQEMUStop, func(ctx context.Context, _ Empty) error { return in.Stop(ctx) },
		func(l *Lease, mig string, _ Empty) {
			del := func(s string) bool { return s == mig }
			l.Incoming, l.Committed = slices.DeleteFunc(l.Incoming, del), slices.DeleteFunc(l.Committed, del)
		})
	Handle(a, MethodQEMUQuery, func(ctx context.Context, _ string, req qemu.Query) (json.RawMessage, error) {
		return in.Query(ctx, req)
	})
	HandleStream(a, MethodQEMUWatch, func(ctx context.Context, _ string, _ Empty, send func(QEMUExit) error) error {
		exited := in.Exited()
		if m, ok := in.(interface {
			exitedFor(context.Context) <-chan struct{}
		}); ok {
			exited = m.exitedFor(ctx) // one of many: the call's migration's
		}
		select {
		case <-exited:
			return send(QEMUExit{Exited: true})
		case <-ctx.Done():
			return ctx.Err()
		}
	})
}

// RemoteIncoming is qemu.Incoming on the peer behind Peer. Exited closes
// when the peer says its QEMU exited, or when the watch breaks (the
// destination's daemon gone): either way the destination is lost.
type RemoteIncoming struct {
	Peer *PeerClient

	mu     sync.Mutex
	exited chan struct{}
	stop   context.CancelFunc
}

var _ qemu.Incoming = (*RemoteIncoming)(nil)

// Start implements qemu.Incoming, then watches the destination QEMU.
func (r *RemoteIncoming) Start(ctx context.Context, req qemu.IncomingStart) error {
	if err := call(ctx, r.Peer, MethodQEMUStart, req); err != nil {
		return err
	}
	wctx, stop := context.WithCancel(context.Background())
	exited := make(chan struct{})
	r.mu.Lock()
	r.exited, r.stop = exited, stop
	r.mu.Unlock()
	go func() {
		defer close(exited)
		CallStream(wctx, r.Peer, MethodQEMUWatch, Empty{}, func(QEMUExit) error { return nil })
	}()
	return nil
}

// Query implements qemu.Incoming.
func (r *RemoteIncoming) Query(ctx context.Context, req qemu.Query) (json.RawMessage, error) {
	return Call[qemu.Query, json.RawMessage](ctx, r.Peer, MethodQEMUQuery, req)
}

// ExportDisk implements qemu.Incoming.
func (r *RemoteIncoming) ExportDisk(ctx context.Context, req qemu.DiskExport) error {
	return call(ctx, r.Peer, MethodQEMUExportDisk, req)
}

// Reserve reserves the migration's ports on the peer (incoming.reserve:
// Peer should be PeerClient.ForMigration's) and returns them.
func (r *RemoteIncoming) Reserve(ctx context.Context) (MigrationPorts, error) {
	return Call[Empty, MigrationPorts](ctx, r.Peer, MethodIncomingReserve, Empty{})
}

// Release ends the migration on the peer (incoming.release): its disk
// servers stop, a QEMU still waiting for the stream is stopped, and its
// ports are free.
func (r *RemoteIncoming) Release(ctx context.Context) error {
	return call(ctx, r.Peer, MethodIncomingRelease, Empty{})
}

// UnexportDisk implements qemu.Incoming.
func (r *RemoteIncoming) UnexportDisk(ctx context.Context) error {
	return call(ctx, r.Peer, MethodQEMUUnexportDisk, Empty{})
}

// WaitRunning implements qemu.Incoming.
func (r *RemoteIncoming) WaitRunning(ctx context.Context, req qemu.RunningWait) error {
	return call(ctx, r.Peer, MethodQEMUWaitRunning, req)
}

// Stop implements qemu.Incoming; the watch ends with it.
func (r *RemoteIncoming) Stop(ctx context.Context) error {
	err := call(ctx, r.Peer, MethodQEMUStop, Empty{})
	r.mu.Lock()
	if r.stop != nil {
		r.stop()
	}
	r.mu.Unlock()
	return err
}

// Close ends the watch of the destination QEMU (once the migration is
// over: the VM is the destination host's now).
func (r *RemoteIncoming) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stop != nil {
		r.stop()
	}
}

// Exited implements qemu.Incoming.
func (r *RemoteIncoming) Exited() <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.exited == nil {
		return nil
	}
	return r.exited
}
