package ddns

import (
	"encoding/base64"
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
		// Whitespace inside the quoted secret: BIND and nsupdate -k accept it.
		{"secret split by a space", "key \"k\" { algorithm hmac-sha256; secret \"" + secret[:20] + " " + secret[20:] + "\"; };",
			Key{"k.", dns.HmacSHA256, secret}, ""},
		{"secret split by newline and tab", "key \"k\" {\n\talgorithm hmac-sha256;\n\tsecret \"" + secret[:16] + "\n\t\t" + secret[16:32] + "\n\t\t" + secret[32:] + "\";\n};\n",
			Key{"k.", dns.HmacSHA256, secret}, ""},
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
	// Secrets with whitespace inside the quotes, as generators write them.
	f.Add("key \"k\" { algorithm hmac-sha256; secret \"c2Vj cmV0\"; };")
	f.Add("key \"k\" {\n\talgorithm hmac-sha512;\n\tsecret \"c2Vj\n\t\tcmV0\r\n\t\tMTI=\";\n};\n")
	f.Fuzz(func(t *testing.T, text string) {
		k, err := ParseKey(text)
		if err != nil {
			return
		}
		if k.Name == "" || k.Secret == "" || k.Algorithm == "" || !dns.IsFqdn(k.Name) {
			t.Fatalf("accepted an incomplete key: %+v", k)
		}
		if strings.ContainsAny(k.Secret, " \t\r\n") {
			t.Fatalf("secret kept its whitespace: %q", k.Secret)
		}
		if b, err := base64.StdEncoding.DecodeString(k.Secret); err != nil || len(b) == 0 {
			t.Fatalf("accepted secret %q does not decode: %v", k.Secret, err)
		}
		// The same key with its secret split by whitespace, as generators
		// write long secrets, is the same key.
		mid := len(k.Secret) / 2
		split := "key \"" + k.Name + "\" { algorithm " + k.Algorithm + "; secret \"" + k.Secret[:mid] + " \n\t" + k.Secret[mid:] + "\"; };"
		if k2, err := ParseKey(split); err != nil || k2 != k {
			t.Fatalf("secret split by whitespace: %+v, %v; want %+v", k2, err, k)
		}
	})
}
