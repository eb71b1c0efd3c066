// Package units parses and prints the quantities vmhop configs use: bit rates
// ("100mbit", "12.5MB/s") and byte sizes ("64MiB"). Both implement
// encoding.TextUnmarshaler so config decoding and flags share one parser.
//
// One rule tells bytes from bits: a capital B is bytes, "bit" is bits. A
// lowercase b alone ("100mbps", "64mb") is refused: tc reads "mbps" as
// megabytes per second where most tools mean megabits, and an 8-fold
// mistake on a migration's bandwidth is not worth a guess. Prefixes k, M, G,
// T are decimal (case-insensitive); Ki, Mi, Gi, Ti are binary.
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

// prefix returns the multiplier of a unit prefix: "", k, M, G, T (decimal,
// any case) or Ki, Mi, Gi, Ti (binary, the i in any case).
func prefix(p string) (float64, bool) {
	if p == "" {
		return 1, true
	}
	i := strings.IndexByte("kmgt", lower(p[0]))
	if i < 0 {
		return 0, false
	}
	switch strings.ToLower(p[1:]) {
	case "":
		return math.Pow(1000, float64(i+1)), true
	case "i":
		return math.Pow(1024, float64(i+1)), true
	}
	return 0, false
}

func lower(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

// split separates "12.5 MB/s" into the number and the unit ("MB/s"): the unit
// is the trailing run of letters and slashes.
func split(s string) (float64, string, bool) {
	t := strings.TrimSpace(s)
	i := len(t)
	for i > 0 && (t[i-1] == '/' || ('a' <= lower(t[i-1]) && lower(t[i-1]) <= 'z')) {
		i--
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(t[:i]), 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, "", false
	}
	return v, t[i:], true
}

// ParseBitrate reads a rate in bits per second:
//
//	"100mbit", "100Mbit/s", "1.5gbit", "64000" (bits per second, as tc)
//	"12.5MB/s", "12.5MBps", "1GiB/s"           (bytes per second, times 8)
//
// A lowercase b without "it" ("100mbps", "100Mb/s") is refused as ambiguous,
// with both readings in the error.
func ParseBitrate(s string) (Bitrate, error) {
	v, unit, ok := split(s)
	if !ok {
		return 0, fmt.Errorf("%q is not a bit rate (want e.g. \"100mbit\" or \"12.5MB/s\")", s)
	}
	per := unit
	for _, suf := range []string{"/s", "ps", "PS"} {
		per = strings.TrimSuffix(per, suf)
	}
	perSecond := per != unit
	var mult float64
	switch {
	case unit == "":
		mult = 1
	case strings.HasSuffix(strings.ToLower(per), "bit") || strings.HasSuffix(strings.ToLower(per), "bits"):
		p := strings.TrimSuffix(strings.TrimSuffix(strings.ToLower(per), "s"), "bit")
		m, ok := prefix(p)
		if !ok {
			return 0, fmt.Errorf("%q: unknown unit %q (want bit, kbit, mbit, gbit)", s, unit)
		}
		mult = m
	case strings.HasSuffix(per, "B"):
		m, ok := prefix(strings.TrimSuffix(per, "B"))
		if !ok {
			return 0, fmt.Errorf("%q: unknown unit %q (want B/s, kB/s, MB/s, GB/s, MiB/s)", s, unit)
		}
		if !perSecond {
			return 0, fmt.Errorf("%q is a size, not a rate: write %q", s, s+"/s")
		}
		mult = 8 * m
	case strings.HasSuffix(per, "b"):
		p := strings.TrimSuffix(per, "b")
		if _, ok := prefix(p); !ok {
			return 0, fmt.Errorf("%q: unknown unit %q (want e.g. \"100mbit\" or \"12.5MB/s\")", s, unit)
		}
		n := strconv.FormatFloat(v, 'f', -1, 64)
		return 0, fmt.Errorf("%q is ambiguous: tc reads %q as bytes per second, most tools as bits: write %q for bits or %q for bytes per second",
			s, unit, n+strings.ToLower(p)+"bit", n+strings.ToUpper(p[:min(len(p), 1)])+p[min(len(p), 1):]+"B/s")
	default:
		return 0, fmt.Errorf("%q: unknown unit %q (want e.g. \"100mbit\" or \"12.5MB/s\")", s, unit)
	}
	if v*mult > math.MaxUint64/2 {
		return 0, fmt.Errorf("%q is not a bit rate: too large", s)
	}
	return Bitrate(math.Round(v * mult)), nil
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

// Explain prints the rate in both units, e.g. "90mbit (90000000 bit/s = 11.25 MB/s)".
func (r Bitrate) Explain() string {
	return fmt.Sprintf("%s (%d bit/s = %s MB/s)", r, uint64(r), strconv.FormatFloat(float64(r)/8e6, 'f', -1, 64))
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

// ParseByteSize reads a size in bytes: "64MiB", "1GiB", "1MB" (10^6),
// "4096", "4096B", and the bare binary letters "512k", "1g" (as QEMU and
// dd write them). A lowercase b ("64mb", "64Mib") is refused: it reads as
// bits.
func ParseByteSize(s string) (ByteSize, error) {
	v, unit, ok := split(s)
	if !ok {
		return 0, fmt.Errorf("%q is not a size (want e.g. \"64MiB\")", s)
	}
	var mult float64
	switch {
	case unit == "":
		mult = 1
	case len(unit) == 1 && strings.ContainsRune("kmgtKMGT", rune(unit[0])):
		mult, _ = prefix(unit + "i")
	case strings.HasSuffix(unit, "B"):
		m, ok := prefix(strings.TrimSuffix(unit, "B"))
		if !ok {
			return 0, fmt.Errorf("%q: unknown unit %q (want B, KiB, MiB, GiB, kB, MB, GB)", s, unit)
		}
		mult = m
	case strings.HasSuffix(unit, "b"):
		p := strings.TrimSuffix(unit, "b")
		if _, ok := prefix(p); !ok {
			return 0, fmt.Errorf("%q: unknown unit %q (want e.g. \"64MiB\")", s, unit)
		}
		return 0, fmt.Errorf("%q: a lowercase b is bits; write %q for bytes", s,
			strconv.FormatFloat(v, 'f', -1, 64)+strings.ToUpper(p[:min(len(p), 1)])+p[min(len(p), 1):]+"B")
	default:
		return 0, fmt.Errorf("%q: unknown unit %q (want B, KiB, MiB, GiB, kB, MB, GB)", s, unit)
	}
	if v*mult > math.MaxUint64/2 {
		return 0, fmt.Errorf("%q is not a size: too large", s)
	}
	return ByteSize(math.Round(v * mult)), nil
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

// Explain prints the size with its byte count, e.g. "16MiB (16777216 bytes)".
func (b ByteSize) Explain() string { return fmt.Sprintf("%s (%d bytes)", b, uint64(b)) }

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
