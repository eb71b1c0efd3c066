package units

import (
	"strings"
	"testing"
)

func TestParseBitrate(t *testing.T) {
	tests := []struct {
		in   string
		want Bitrate
		err  string // a part of the error; "" for success
	}{
		{"100mbit", 100 * Mbit, ""},
		{"100Mbit/s", 100 * Mbit, ""},
		{"100mbits", 100 * Mbit, ""},
		{"1gbit", Gbit, ""},
		{"1.5Gbit", 1500 * Mbit, ""},
		{"800kbit", 800 * Kbit, ""},
		{"64000", 64000, ""},
		{" 10 mbit ", 10 * Mbit, ""},
		// A capital B is bytes: 12.5 MB/s is 100 Mbit/s, not 12.5.
		{"12.5MBps", 100 * Mbit, ""},
		{"100MB/s", 800 * Mbit, ""},
		{"1MiB/s", 8 << 20, ""},
		{"1kB/s", 8 * Kbit, ""},
		// A lowercase b without "it" is refused, naming both readings.
		{"100mbps", 0, `"100mbps" is ambiguous: tc reads "mbps" as bytes per second, most tools as bits: write "100mbit" for bits or "100MB/s" for bytes per second`},
		{"100Mbps", 0, `write "100mbit" for bits or "100MB/s"`},
		{"100Mb/s", 0, "ambiguous"},
		{"8000bps", 0, `write "8000bit" for bits or "8000B/s"`},
		{"12.5MB", 0, `"12.5MB" is a size, not a rate: write "12.5MB/s"`},
		{"", 0, "is not a bit rate"},
		{"fast", 0, "is not a bit rate"},
		{"10 furlongs", 0, `unknown unit "furlongs"`},
		{"-1mbit", 0, "is not a bit rate"},
		{"1e400mbit", 0, "is not a bit rate"},
	}
	for _, tt := range tests {
		got, err := ParseBitrate(tt.in)
		if tt.err == "" {
			if err != nil || got != tt.want {
				t.Errorf("ParseBitrate(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("ParseBitrate(%q) = %v, %v; want an error with %q", tt.in, got, err, tt.err)
		}
	}
	if s := (100 * Mbit).String(); s != "100mbit" {
		t.Errorf("String() = %q", s)
	}
	if s := (90 * Mbit).Explain(); s != "90mbit (90000000 bit/s = 11.25 MB/s)" {
		t.Errorf("Explain() = %q", s)
	}
}

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		err  string
	}{
		{"64MiB", 64 * MiB, ""},
		{"1GiB", GiB, ""},
		{"512k", 512 * KiB, ""},
		{"1MB", 1000000, ""},
		{"4096", 4096, ""},
		{"4096B", 4096, ""},
		{"1.5KiB", 1536, ""},
		{"64mb", 0, `"64mb": a lowercase b is bits; write "64MB" for bytes`},
		{"64Mib", 0, `write "64MiB"`},
		{"lots", 0, "is not a size"},
		{"-5k", 0, "is not a size"},
		{"5 parsecs", 0, `unknown unit "parsecs"`},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if tt.err == "" {
			if err != nil || got != tt.want {
				t.Errorf("ParseByteSize(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.err) {
			t.Errorf("ParseByteSize(%q) = %v, %v; want an error with %q", tt.in, got, err, tt.err)
		}
	}
	if s := (64 * MiB).String(); s != "64MiB" {
		t.Errorf("String() = %q", s)
	}
}
