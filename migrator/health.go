package migrator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"
)

// ErrUnhealthy is the error of a migration whose VM moved (it runs at the
// destination, the source is kept paused) but did not pass its health check
// by the deadline.
var ErrUnhealthy = errors.New("moved, but the VM does not answer at the destination")

// HealthCheck decides, after the destination resumed, that the VM serves
// there: every check set must pass within Deadline. Checks are retried
// every 250 ms; each attempt has a second.
type HealthCheck struct {
	Target   netip.Addr // the VM's address as its new clients reach it (new_ip)
	TCPPort  uint16     // a TCP connection to Target:TCPPort is accepted (0: none)
	HTTPPath string     // GET http://Target:HTTPPort/HTTPPath answers 2xx or 3xx ("": none)
	HTTPPort uint16
	Deadline time.Duration
	// Dial opens the checks' connections (from the coordinating host's
	// network namespace); nil uses a net.Dialer.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
}

// Enabled says whether any check is set.
func (h *HealthCheck) Enabled() bool { return h != nil && (h.TCPPort != 0 || h.HTTPPath != "") }

// String names the checks, for reports and errors.
func (h *HealthCheck) String() string {
	if !h.Enabled() {
		return "none"
	}
	s := ""
	if h.TCPPort != 0 {
		s = "tcp " + netip.AddrPortFrom(h.Target, h.TCPPort).String()
	}
	if h.HTTPPath != "" {
		if s != "" {
			s += " and "
		}
		s += "http GET " + h.url()
	}
	return s
}

func (h *HealthCheck) url() string {
	return "http://" + netip.AddrPortFrom(h.Target, h.HTTPPort).String() + h.HTTPPath
}

// Wait retries the checks until all pass (nil, with the time it took) or
// the deadline passes (an error wrapping ErrUnhealthy that names the check
// and its last failure).
func (h *HealthCheck) Wait(ctx context.Context) (time.Duration, error) {
	t0 := time.Now()
	dctx, cancel := context.WithTimeout(ctx, h.Deadline)
	defer cancel()
	var last error
	for {
		if last = h.once(dctx); last == nil {
			return time.Since(t0), nil
		}
		select {
		case <-dctx.Done():
			if ctx.Err() != nil {
				return time.Since(t0), ctx.Err()
			}
			return time.Since(t0), fmt.Errorf("%w: %v for %s", ErrUnhealthy, last, h.Deadline)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (h *HealthCheck) once(ctx context.Context) error {
	dial := h.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	actx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if h.TCPPort != 0 {
		addr := netip.AddrPortFrom(h.Target, h.TCPPort).String()
		c, err := dial(actx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("tcp %s: %w", addr, err)
		}
		c.Close()
	}
	if h.HTTPPath != "" {
		client := &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
		req, err := http.NewRequestWithContext(actx, http.MethodGet, h.url(), nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("http GET %s: %w", h.url(), err)
		}
		resp.Body.Close()
		if resp.StatusCode >= 400 {
			return fmt.Errorf("http GET %s: status %s", h.url(), strconv.Itoa(resp.StatusCode))
		}
	}
	return nil
}
