package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
)

// Code classifies an API error, in gRPC's words (google.rpc.Code), so a
// caller can tell "refused, try later" from "bad request".
type Code string

// The codes vmhop's APIs use.
const (
	CodeInvalidArgument    Code = "invalid_argument"    // the request is malformed or names bad values
	CodeNotFound           Code = "not_found"           // no such method, migration or secret
	CodeAlreadyExists      Code = "already_exists"      // e.g. a migration of that VM runs already
	CodeFailedPrecondition Code = "failed_precondition" // e.g. protocol versions differ
	CodePermissionDenied   Code = "permission_denied"   // the caller may not do this
	CodeUnavailable        Code = "unavailable"         // the daemon is stopping, or a peer cannot be reached
	CodeInternal           Code = "internal"            // anything else: the message says what
)

var codeStatus = map[Code]int{
	CodeInvalidArgument:    http.StatusBadRequest,
	CodeNotFound:           http.StatusNotFound,
	CodeAlreadyExists:      http.StatusConflict,
	CodeFailedPrecondition: http.StatusPreconditionFailed,
	CodePermissionDenied:   http.StatusForbidden,
	CodeUnavailable:        http.StatusServiceUnavailable,
	CodeInternal:           http.StatusInternalServerError,
}

// Error is an API error as it crosses the wire, as JSON
// {"error": {"code": "already_exists", "reason": "...", "message": "..."}}.
type Error struct {
	Code Code `json:"code"`
	// Reason names a sentinel error registered with RegisterError (as
	// google.rpc.ErrorInfo's reason does): the receiving side's Error
	// unwraps to that sentinel, so errors.Is works across the wire.
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return string(e.Code) + ": " + e.Message }

// Unwrap is the sentinel error registered for e.Reason, if any.
func (e *Error) Unwrap() error {
	sentinelsMu.RLock()
	defer sentinelsMu.RUnlock()
	return sentinels[e.Reason].err
}

type sentinel struct {
	code Code
	err  error
}

var (
	sentinelsMu sync.RWMutex
	sentinels   = map[string]sentinel{} // by reason
)

// RegisterError makes err (a sentinel such as migrator.ErrImageExists)
// cross the APIs as itself: a handler's error that errors.Is err is sent
// with code and reason, and the caller's error then errors.Is err too.
// Register at init, the same on both sides; reason is a stable name such
// as "image_exists".
func RegisterError(reason string, code Code, err error) {
	sentinelsMu.Lock()
	defer sentinelsMu.Unlock()
	if _, dup := sentinels[reason]; dup {
		panic("daemon: error reason " + reason + " registered twice")
	}
	sentinels[reason] = sentinel{code: code, err: err}
}

// Errorf makes an *Error with code and a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// CodeOf is the Code of the first *Error in err's chain, or "" if none.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

func asAPIError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	sentinelsMu.RLock()
	defer sentinelsMu.RUnlock()
	for reason, s := range sentinels {
		if errors.Is(err, s.err) {
			return &Error{Code: s.code, Reason: reason, Message: err.Error()}
		}
	}
	return &Error{Code: CodeInternal, Message: err.Error()}
}

// errorBody is how an error travels in a response.
type errorBody struct {
	Error *Error `json:"error"`
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	e := asAPIError(err)
	status, ok := codeStatus[e.Code]
	if !ok {
		status = http.StatusInternalServerError
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(errorBody{e})
}

// maxRequest bounds a request body: specs and API arguments are small.
const maxRequest = 4 << 20

// decodeRequest reads a JSON request body into v.
func decodeRequest(w http.ResponseWriter, r *http.Request, v any) error {
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRequest)).Decode(v); err != nil {
		return Errorf(CodeInvalidArgument, "decode request: %v", err)
	}
	return nil
}

// A stream is a response of newline-delimited JSON frames (NDJSON,
// Content-Type application/x-ndjson): {"event": ...} any number of times,
// then {"end": true}, or {"error": {...}} if the stream failed. A stream
// that stops without either was cut.
type frame struct {
	Event json.RawMessage `json:"event,omitempty"`
	Error *Error          `json:"error,omitempty"`
	End   bool            `json:"end,omitempty"`
}

// streamWriter writes a stream's frames, each flushed as it is written.
type streamWriter struct {
	w   http.ResponseWriter
	enc *json.Encoder
}

func startStream(w http.ResponseWriter) *streamWriter {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	return &streamWriter{w: w, enc: json.NewEncoder(w)}
}

func (s *streamWriter) write(f frame) error {
	if err := s.enc.Encode(f); err != nil {
		return err
	}
	http.NewResponseController(s.w).Flush()
	return nil
}

func (s *streamWriter) send(ev any) error {
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	return s.write(frame{Event: b})
}

// end closes the stream with {"end": true}, or with err's frame.
func (s *streamWriter) end(err error) {
	if err != nil {
		s.write(frame{Error: asAPIError(err)})
		return
	}
	s.write(frame{End: true})
}

// do sends a request and decodes a JSON response into out (nil: drop it),
// or returns the *Error the server sent.
func do(hc *http.Client, req *http.Request, out any) error {
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return responseError(resp)
	}
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode response: %w", err)
	}
	return nil
}

// doStream sends a request and hands each event of the stream it answers
// with to recv, until the end frame; recv's error stops it.
func doStream(hc *http.Client, req *http.Request, recv func(json.RawMessage) error) error {
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return responseError(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), maxRequest)
	for sc.Scan() {
		var f frame
		if err := json.Unmarshal(sc.Bytes(), &f); err != nil {
			return fmt.Errorf("decode stream frame: %w", err)
		}
		switch {
		case f.Error != nil:
			return f.Error
		case f.End:
			return nil
		}
		if err := recv(f.Event); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read stream: %w", err)
	}
	return errors.New("read stream: cut before its end")
}

func responseError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var eb errorBody
	if json.Unmarshal(body, &eb) == nil && eb.Error != nil {
		return eb.Error
	}
	return fmt.Errorf("http %s: %s", resp.Status, bytes.TrimSpace(body))
}

func newJSONRequest(ctx context.Context, method, url string, in any) (*http.Request, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return nil, err
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return req, nil
}
