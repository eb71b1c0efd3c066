package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"
)

// ErrNoSpace is the destination's filesystem being full: a write there
// failed with ENOSPC, or it has less free space than the image needs
// (migrator.Host.CreateImage). Errors wrapping it name the host and the
// path.
var ErrNoSpace = errors.New("no space left on the destination")

// RoundErrorReporter is a DiskServer that can say why the destination
// ended its last chunked round itself (a local failure there, such as a
// full disk) rather than the connection: Converge asks it after a cut
// and stops retrying when the destination cannot go on.
type RoundErrorReporter interface {
	ChunkedError(ctx context.Context, req ChunkedStop) (RoundError, error)
}

// RoundError is why the destination ended its last round ("" none, or
// the connection).
type RoundError struct {
	Error   string `json:"error,omitempty"`
	NoSpace bool   `json:"no_space,omitempty"` // the error is ErrNoSpace
}

// writeAt writes to the destination image (tests replace it to see a
// full disk).
var writeAt = func(f *os.File, b []byte, off int64) (int, error) { return f.WriteAt(b, off) }

// noSpace wraps a write error that is ENOSPC as ErrNoSpace, naming path.
func noSpace(path string, err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrNoSpace, err) // err names the path
	}
	return err
}

var _ RoundErrorReporter = (*LocalDiskServer)(nil)

// ChunkedError implements RoundErrorReporter: the last round's error of
// the image served at req.Listen, if the destination ended it for a local
// reason.
func (cs *LocalDiskServer) ChunkedError(_ context.Context, req ChunkedStop) (RoundError, error) {
	cs.mu.Lock()
	sv := cs.live[req.Listen]
	cs.mu.Unlock()
	if sv == nil {
		return RoundError{}, fmt.Errorf("chunked sync: nothing serves %s", req.Listen)
	}
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.lastErr == nil {
		return RoundError{}, nil
	}
	return RoundError{Error: sv.lastErr.Error(), NoSpace: errors.Is(sv.lastErr, ErrNoSpace)}, nil
}

// destFailure asks the destination, after a cut, whether it ended the
// round because it cannot go on (its disk is full): that error, or nil.
func (s *ChunkedSync) destFailure(ctx context.Context, round int) error {
	rep, ok := s.Server.(RoundErrorReporter)
	if !ok {
		return nil
	}
	re, err := rep.ChunkedError(ctx, ChunkedStop{Listen: s.DestWAN})
	if err != nil || !re.NoSpace {
		return nil
	}
	return noSpaceError{fmt.Sprintf("chunked sync: round %d: the destination (%s) cannot write the image: %s", round, s.DestWAN, re.Error)}
}

// noSpaceError is a message that already says why, and is ErrNoSpace.
type noSpaceError struct{ msg string }

func (e noSpaceError) Error() string        { return e.msg }
func (e noSpaceError) Is(target error) bool { return target == ErrNoSpace }
