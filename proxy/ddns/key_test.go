package ddns

import (
	"strings"
	"testing"

	"github.com/miekg/dns"
)

func TestParseKey(t *testing.T) {
	const secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="
	tests := []struct {
		name, text string
		want       Key
		err        string
	}{
		{"tsig-keygen output", "key \"vmhop-lab\" {\n\talgorithm hmac-sha256;\n\tsecret \"" + secret + "\";\n};\n",
			Key{"vmhop-lab.", dns.HmacSHA256, secret}, ""},
		{"one line, comments, unquoted", "# made by hand\nkey k1. { /* old */ algorithm HMAC-SHA512; // strong\n secret " + secret + "; };",
			Key{"k1.", dns.HmacSHA512, secret}, ""},
		{"md5 long name", `key "k" { algorithm hmac-md5.sig-alg.reg.int; secret "` + secret + `"; };`,
			Key{"k.", dns.HmacMD5, secret}, ""},
		{"bad algorithm", `key "k" { algorithm rot13; secret "` + secret + `"; };`, Key{}, `algorithm "rot13"`},
		{"bad secret", `key "k" { algorithm hmac-sha256; secret "not base64!"; };`, Key{}, "not base64"},
		{"no secret", `key "k" { algorithm hmac-sha256; };`, Key{}, "needs both"},
		{"missing brace", `key "k" { algorithm hmac-sha256; secret "` + secret + `";`, Key{}, "missing }"},
		{"unknown statement", `key "k" { color blue; };`, Key{}, `unknown statement "color"`},
		{"not a key", `zone "x" {};`, Key{}, `want "key"`},
		{"unterminated", `key "k`, Key{}, "unterminated string"},
		{"empty", ``, Key{}, "end of file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParseKey(tt.text)
			if tt.err != "" {
				if err == nil || !contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil || k != tt.want {
				t.Fatalf("ParseKey = %+v, %v; want %+v", k, err, tt.want)
			}
		})
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func FuzzParseKey(f *testing.F) {
	f.Add("key \"vmhop-lab\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0\";\n};\n")
	f.Add("key k { algorithm hmac-sha1; secret abc=; }; # x")
	f.Add("/* */ key")
	f.Fuzz(func(t *testing.T, text string) {
		k, err := ParseKey(text)
		if err != nil {
			return
		}
		if k.Name == "" || k.Secret == "" || k.Algorithm == "" || !dns.IsFqdn(k.Name) {
			t.Fatalf("accepted an incomplete key: %+v", k)
		}
	})
}
