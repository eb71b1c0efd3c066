package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"
)

// SocketMode is the local API socket's mode: owner (root) and group
// (vmhop) may connect, nobody else.
const SocketMode = 0o660

// listenSocket listens on the unix socket path with mode SocketMode and,
// if group exists, that group. The socket is bound in a private (0700)
// directory, given its mode and group there, and then renamed into place,
// so it is never reachable with looser permissions. A socket left by a
// vmhopd that died is replaced; one that answers is not.
func listenSocket(path, group string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%q exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("%q: another vmhopd answers on it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		var unknown user.UnknownGroupError
		switch {
		case errors.As(err, &unknown):
		case err != nil:
			return nil, fmt.Errorf("look up group %q: %w", group, err)
		default:
			gid, _ = strconv.Atoi(g.Gid)
		}
	}
	tmp, err := os.MkdirTemp(dir, ".vmhopd-sock-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	bound := filepath.Join(tmp, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: bound, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	err = os.Chmod(bound, SocketMode)
	if err == nil && gid >= 0 {
		err = os.Chown(bound, -1, gid)
	}
	if err == nil {
		err = os.Rename(bound, path)
	}
	if err != nil {
		ln.Close()
		return nil, err
	}
	return &socketListener{UnixListener: ln, path: path}, nil
}

// socketListener removes its socket file when closed.
type socketListener struct {
	*net.UnixListener
	path string
}

func (l *socketListener) Close() error {
	err := l.UnixListener.Close()
	os.Remove(l.path)
	return err
}
