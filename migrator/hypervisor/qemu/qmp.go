// Package qemu drives QEMU for live migration over QMP (the QEMU Machine
// Protocol): a small QMP client with events, machine definitions shared by
// source and destination, and the migration driver.
package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned for commands on a monitor whose connection ended
// (QEMU exited, or Close was called).
var ErrClosed = errors.New("qmp: monitor closed")

// ErrExited is ErrClosed when the QEMU at the other end exited: its
// process is gone, and with it everything it held (the VM, block jobs,
// nodes). errors.Is(err, ErrClosed) holds for it too.
var ErrExited = fmt.Errorf("%w: QEMU exited", ErrClosed)

// Error is a command's error reply.
type Error struct {
	Command string
	Class   string // e.g. "GenericError", "CommandNotFound"
	Desc    string
}

func (e *Error) Error() string { return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc) }

// Event is an asynchronous QMP event.
type Event struct {
	Name string
	Data json.RawMessage
	Time time.Time
}

type reply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	ID        string          `json:"id"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	QMP json.RawMessage `json:"QMP"`
}

// Monitor is a QMP connection. Commands may be issued from several
// goroutines; each carries an id so replies are matched even when events
// arrive in between.
type Monitor struct {
	conn    net.Conn
	wmu     sync.Mutex // serializes writes
	mu      sync.Mutex
	pending map[string]chan reply
	subs    map[chan Event]struct{}
	nextID  uint64
	done    chan struct{}
	err     error // why the reader stopped; valid once done is closed
	pid     int   // QEMU's, from the socket (SO_PEERCRED); 0 if unknown

	goneOnce sync.Once
	gone     bool // the connection ended with QEMU's process (closedErr)
}

// Dial connects to QEMU's QMP unix socket at path, retrying until the socket
// accepts or ctx ends (QEMU creates it a moment after starting), reads the
// greeting and enters command mode.
func Dial(ctx context.Context, path string) (*Monitor, error) {
	var conn net.Conn
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp dial %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	r := bufio.NewReader(conn)
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
	}
	var greet reply
	line, err := r.ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &greet)
	}
	if err != nil || greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp dial %s: no greeting: %v", path, err)
	}
	conn.SetReadDeadline(time.Time{})
	m := &Monitor{conn: conn, pending: map[string]chan reply{}, subs: map[chan Event]struct{}{}, done: make(chan struct{}), pid: peerPID(conn)}
	go m.read(r)
	if err := m.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

func (m *Monitor) read(r *bufio.Reader) {
	var err error
	for {
		var line []byte
		line, err = r.ReadBytes('\n')
		if err != nil {
			break
		}
		var rep reply
		if json.Unmarshal(line, &rep) != nil {
			continue // not ours to judge; QEMU only sends JSON objects
		}
		m.mu.Lock()
		if rep.Event != "" {
			ev := Event{Name: rep.Event, Data: rep.Data,
				Time: time.Unix(rep.Timestamp.Seconds, rep.Timestamp.Microseconds*1000)}
			for ch := range m.subs {
				select {
				case ch <- ev:
				default: // a subscriber that does not keep up loses events, not the monitor
				}
			}
		} else if ch, ok := m.pending[rep.ID]; ok {
			delete(m.pending, rep.ID)
			ch <- rep
		}
		m.mu.Unlock()
	}
	m.mu.Lock()
	m.err = err
	close(m.done)
	for ch := range m.subs {
		close(ch)
	}
	m.subs = nil
	m.mu.Unlock()
}

// Execute runs command with args (nil or a JSON-marshalable value) and
// decodes its return value into out (nil to discard).
func (m *Monitor) Execute(ctx context.Context, command string, args, out any) error {
	return m.execute(ctx, command, args, out, nil)
}

// ExecuteWithFile is Execute with f's descriptor passed along the
// command (SCM_RIGHTS), as QMP's getfd and add-fd take one. f stays the
// caller's (QEMU holds its own copy once the command returned).
func (m *Monitor) ExecuteWithFile(ctx context.Context, command string, args any, f *os.File, out any) error {
	if _, ok := m.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("qmp %s: passing a descriptor needs a unix socket", command)
	}
	return m.execute(ctx, command, args, out, f)
}

func (m *Monitor) execute(ctx context.Context, command string, args, out any, f *os.File) error {
	m.mu.Lock()
	if isDone(m.done) {
		m.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", command, m.closedErr())
	}
	m.nextID++
	id := strconv.FormatUint(m.nextID, 10)
	ch := make(chan reply, 1)
	m.pending[id] = ch
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pending, id)
		m.mu.Unlock()
	}()

	req := map[string]any{"execute": command, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	m.wmu.Lock()
	if f != nil {
		_, _, err = m.conn.(*net.UnixConn).WriteMsgUnix(append(b, '\n'), unix.UnixRights(int(f.Fd())), nil)
	} else {
		_, err = m.conn.Write(append(b, '\n'))
	}
	m.wmu.Unlock()
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	select {
	case rep := <-ch:
		if rep.Error != nil {
			return &Error{Command: command, Class: rep.Error.Class, Desc: rep.Error.Desc}
		}
		if out != nil {
			if err := json.Unmarshal(rep.Return, out); err != nil {
				return fmt.Errorf("qmp %s: decode reply: %w", command, err)
			}
		}
		return nil
	case <-m.done:
		return fmt.Errorf("qmp %s: %w", command, m.closedErr())
	case <-ctx.Done():
		return fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

// Events subscribes to events; cancel ends the subscription. The channel is
// closed when the monitor closes.
func (m *Monitor) Events() (<-chan Event, func()) {
	ch := make(chan Event, 256)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.subs == nil {
		close(ch)
		return ch, func() {}
	}
	m.subs[ch] = struct{}{}
	return ch, func() {
		m.mu.Lock()
		defer m.mu.Unlock()
		if _, ok := m.subs[ch]; ok {
			delete(m.subs, ch)
			close(ch)
		}
	}
}

// closedErr is why commands fail on the ended connection: ErrExited
// when QEMU's process is gone (it is given half a second to be: the
// socket closes as it exits), else ErrClosed.
func (m *Monitor) closedErr() error {
	m.goneOnce.Do(func() {
		if m.pid <= 0 {
			return
		}
		for i := 0; i < 10 && !m.gone; i++ {
			if m.gone = processGone(m.pid); !m.gone {
				time.Sleep(50 * time.Millisecond)
			}
		}
	})
	if m.gone {
		return fmt.Errorf("%w (pid %d)", ErrExited, m.pid)
	}
	return ErrClosed
}

// Exited says whether the connection ended because QEMU's process did.
func (m *Monitor) Exited() bool {
	return isDone(m.done) && errors.Is(m.closedErr(), ErrExited)
}

// PID is QEMU's process id, read from the socket when it connected (0 if
// unknown).
func (m *Monitor) PID() int { return m.pid }

// peerPID is the pid of the process at the other end of a unix socket
// connection (SO_PEERCRED), 0 if unknown.
func peerPID(c net.Conn) int {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0
	}
	pid := 0
	raw.Control(func(fd uintptr) {
		if cred, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); err == nil {
			pid = int(cred.Pid)
		}
	})
	return pid
}

// processGone says whether process pid has exited: no such process, or
// a zombie not yet reaped.
func processGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) state ...: the comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	st := b[i+2]
	return st == 'Z' || st == 'X'
}

// Done is closed when the connection ends.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Close closes the connection.
func (m *Monitor) Close() error {
	err := m.conn.Close()
	<-m.done
	return err
}

func isDone(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
