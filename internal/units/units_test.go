package units

import "testing"

func TestParseBitrate(t *testing.T) {
	tests := []struct {
		in   string
		want Bitrate
		ok   bool
	}{
		{"100mbit", 100 * Mbit, true},
		{"1gbit", Gbit, true},
		{"1.5Gbit", 1500 * Mbit, true},
		{"800kbit", 800 * Kbit, true},
		{"64000", 64000, true},
		{" 10 mbit ", 10 * Mbit, true},
		{"", 0, false},
		{"fast", 0, false},
		{"-1mbit", 0, false},
		{"1e400mbit", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseBitrate(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseBitrate(%q) = %v, %v; want %v ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
	if s := (100 * Mbit).String(); s != "100mbit" {
		t.Errorf("String() = %q", s)
	}
}

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"64MiB", 64 * MiB, true},
		{"1GiB", GiB, true},
		{"512k", 512 * KiB, true},
		{"1MB", 1000000, true},
		{"4096", 4096, true},
		{"4096B", 4096, true},
		{"lots", 0, false},
		{"-5k", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseByteSize(%q) = %v, %v; want %v ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
	if s := (64 * MiB).String(); s != "64MiB" {
		t.Errorf("String() = %q", s)
	}
}
