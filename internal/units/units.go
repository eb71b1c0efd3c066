// Package units parses and prints the quantities vmhop configs use: bit rates
// ("100mbit") and byte sizes ("64MiB"). Both implement encoding.TextUnmarshaler
// so config decoding and flags share one parser.
package units

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Bitrate is a rate in bits per second.
type Bitrate uint64

// Common rates.
const (
	Kbit Bitrate = 1000
	Mbit         = 1000 * Kbit
	Gbit         = 1000 * Mbit
)

var rateSuffixes = []struct {
	s string
	m float64
}{
	// Longest first so "mbit" is not read as "bit".
	{"gbit", 1e9}, {"mbit", 1e6}, {"kbit", 1e3}, {"bit", 1},
	{"gbps", 1e9}, {"mbps", 1e6}, {"kbps", 1e3}, {"bps", 1},
}

// ParseBitrate reads "100mbit", "1.5gbit", "800kbit" or a plain number of bits per second.
// Suffixes are decimal (tc's convention) and case-insensitive.
func ParseBitrate(s string) (Bitrate, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	mult := 1.0
	for _, suf := range rateSuffixes {
		if strings.HasSuffix(t, suf.s) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, suf.s)), suf.m
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) || v*mult > math.MaxUint64/2 {
		return 0, fmt.Errorf("%q is not a bit rate (want e.g. \"100mbit\")", s)
	}
	return Bitrate(v * mult), nil
}

// BytesPerSecond returns the rate in bytes per second, rounded down.
func (r Bitrate) BytesPerSecond() uint64 { return uint64(r) / 8 }

func (r Bitrate) String() string {
	switch {
	case r >= Gbit && r%Gbit == 0:
		return fmt.Sprintf("%dgbit", r/Gbit)
	case r >= Mbit && r%Mbit == 0:
		return fmt.Sprintf("%dmbit", r/Mbit)
	case r >= Kbit && r%Kbit == 0:
		return fmt.Sprintf("%dkbit", r/Kbit)
	}
	return fmt.Sprintf("%dbit", uint64(r))
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (r *Bitrate) UnmarshalText(b []byte) error {
	v, err := ParseBitrate(string(b))
	if err != nil {
		return err
	}
	*r = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (r Bitrate) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// ByteSize is a size in bytes.
type ByteSize uint64

// Binary sizes.
const (
	KiB ByteSize = 1 << 10
	MiB ByteSize = 1 << 20
	GiB ByteSize = 1 << 30
)

var sizeSuffixes = []struct {
	s string
	m float64
}{
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40},
	{"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
	{"k", 1 << 10}, {"m", 1 << 20}, {"g", 1 << 30}, {"t", 1 << 40},
	{"b", 1},
}

// ParseByteSize reads "64MiB", "1GiB", "512k", "4096" (bytes). KiB/MiB/GiB and the
// bare letters k/m/g are binary; kB/MB/GB are decimal.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	mult := 1.0
	for _, suf := range sizeSuffixes {
		if strings.HasSuffix(t, suf.s) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, suf.s)), suf.m
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) || v*mult > math.MaxUint64/2 {
		return 0, fmt.Errorf("%q is not a size (want e.g. \"64MiB\")", s)
	}
	return ByteSize(v * mult), nil
}

func (b ByteSize) String() string {
	switch {
	case b >= GiB && b%GiB == 0:
		return fmt.Sprintf("%dGiB", b/GiB)
	case b >= MiB && b%MiB == 0:
		return fmt.Sprintf("%dMiB", b/MiB)
	case b >= KiB && b%KiB == 0:
		return fmt.Sprintf("%dKiB", b/KiB)
	}
	return fmt.Sprintf("%dB", uint64(b))
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (b *ByteSize) UnmarshalText(t []byte) error {
	v, err := ParseByteSize(string(t))
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (b ByteSize) MarshalText() ([]byte, error) { return []byte(b.String()), nil }
