package labrun

import (
	"context"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"

	"github.com/vmhop/vmhop/internal/lab"
	"github.com/vmhop/vmhop/internal/netns"
)

// Capture records, with tcpdump on the client's interface, the probe's
// traffic: what a real client received, packet by packet.
type Capture struct {
	File string
	stop func()
}

// StartCapture captures TCP port port on the client's eth0 into file.
func StartCapture(l *lab.Lab, file string, port int) (*Capture, error) {
	return StartCaptureFilter(l, file, fmt.Sprintf("tcp port %d", port))
}

// StartCaptureFilter captures what filter (tcpdump's syntax) lets through
// on the client's eth0 into file: 128 bytes of each packet (headers and
// the echo payloads), with the packet's length on the wire.
func StartCaptureFilter(l *lab.Lab, file, filter string) (*Capture, error) {
	cmd := netns.Command(context.Background(), l.NS(lab.Client), "tcpdump", "-i", "eth0", "-U", "-n", "-s", "128",
		"-w", file, filter)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("tcpdump: %w", err)
	}
	// tcpdump writes the file header once its filter is in place.
	for i := 0; i < 100; i++ {
		if st, err := os.Stat(file); err == nil && st.Size() > 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return &Capture{File: file, stop: func() { cmd.Process.Signal(syscall.SIGINT); cmd.Wait() }}, nil
}

// Stop ends the capture and returns the arrival times of packets carrying
// payload from the server side (source port port) to the client.
func (c *Capture) Stop(port int) ([]time.Time, int, error) {
	byPort, total, err := c.StopByPort(port)
	var all []time.Time
	for _, a := range byPort {
		all = append(all, a...)
	}
	return all, total, err
}

// StopByPort ends the capture and returns, per client port, the arrival
// times of packets carrying payload from the server side (source port
// port) to the client, and the number of packets captured.
func (c *Capture) StopByPort(port int) (map[uint16][]time.Time, int, error) {
	c.stop()
	f, err := os.Open(c.File)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		return nil, 0, err
	}
	arrivals := map[uint16][]time.Time{}
	total := 0
	for {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			break
		}
		total++
		p := gopacket.NewPacket(data, layers.LayerTypeEthernet, gopacket.NoCopy)
		tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if tcp != nil && int(tcp.SrcPort) == port && len(tcp.Payload) > 0 {
			arrivals[uint16(tcp.DstPort)] = append(arrivals[uint16(tcp.DstPort)], ci.Timestamp)
		}
	}
	return arrivals, total, nil
}
