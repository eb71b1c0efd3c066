package ddns

import (
	"encoding/base64"
	"fmt"
	"os"
	"strings"

	"github.com/miekg/dns"
)

// Key is a TSIG key (RFC 8945).
type Key struct {
	Name      string // fully qualified key name, e.g. "vmhop-lab."
	Algorithm string // miekg/dns algorithm name, e.g. dns.HmacSHA256
	Secret    string // base64
}

// algorithms maps BIND's names to miekg/dns's.
var algorithms = map[string]string{
	"hmac-md5":                 dns.HmacMD5,
	"hmac-md5.sig-alg.reg.int": dns.HmacMD5,
	"hmac-sha1":                dns.HmacSHA1,
	"hmac-sha224":              dns.HmacSHA224,
	"hmac-sha256":              dns.HmacSHA256,
	"hmac-sha384":              dns.HmacSHA384,
	"hmac-sha512":              dns.HmacSHA512,
}

// NewKey checks and normalizes a key given in config form. Whitespace inside
// the base64 secret is dropped.
func NewKey(name, algorithm, secret string) (Key, error) {
	alg, ok := algorithms[strings.TrimSuffix(strings.ToLower(algorithm), ".")]
	if !ok {
		return Key{}, fmt.Errorf("tsig key %q: algorithm %q is not one of hmac-md5, hmac-sha1, hmac-sha224, hmac-sha256, hmac-sha384, hmac-sha512", name, algorithm)
	}
	if _, ok := dns.IsDomainName(name); !ok || name == "" {
		return Key{}, fmt.Errorf("tsig key name %q is not a domain name", name)
	}
	// BIND reads the secret's base64 skipping whitespace, as RFC 4648 §3.3
	// lets a decoder do: generators split long secrets by spaces or by a
	// newline and tabs, and `nsupdate -k` accepts them.
	secret = strings.Join(strings.Fields(secret), "")
	if b, err := base64.StdEncoding.DecodeString(secret); err != nil || len(b) == 0 {
		return Key{}, fmt.Errorf("tsig key %q: secret is not base64", name)
	}
	return Key{Name: dns.CanonicalName(name), Algorithm: alg, Secret: secret}, nil
}

// LoadKey reads a BIND-format key file.
func LoadKey(path string) (Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Key{}, fmt.Errorf("tsig key file: %w", err)
	}
	k, err := ParseKey(string(b))
	if err != nil {
		return Key{}, fmt.Errorf("tsig key file %s: %w", path, err)
	}
	return k, nil
}

// ParseKey reads the first key of a BIND key file, as tsig-keygen writes it:
//
//	key "name" { algorithm hmac-sha256; secret "base64"; };
//
// Comments (#, //, /* */), any layout, and whitespace inside the quoted
// secret (`secret "abcd efgh";`) are accepted, as BIND accepts them.
func ParseKey(text string) (Key, error) {
	toks, err := tokenize(text)
	if err != nil {
		return Key{}, err
	}
	i := 0
	next := func() string {
		if i >= len(toks) {
			return ""
		}
		i++
		return toks[i-1]
	}
	expect := func(want string) error {
		if got := next(); got != want {
			if got == "" {
				got = "end of file"
			}
			return fmt.Errorf("want %q, got %q", want, got)
		}
		return nil
	}
	if err := expect("key"); err != nil {
		return Key{}, err
	}
	name := next()
	if name == "" || name == "{" {
		return Key{}, fmt.Errorf("key has no name")
	}
	if err := expect("{"); err != nil {
		return Key{}, err
	}
	var alg, secret string
	for {
		t := next()
		switch t {
		case "}":
			if err := expect(";"); err != nil {
				return Key{}, err
			}
			if alg == "" || secret == "" {
				return Key{}, fmt.Errorf("key %q needs both algorithm and secret", name)
			}
			return NewKey(name, alg, secret)
		case "algorithm", "secret":
			v := next()
			if v == "" || v == ";" || v == "}" {
				return Key{}, fmt.Errorf("key %q: %s has no value", name, t)
			}
			if err := expect(";"); err != nil {
				return Key{}, fmt.Errorf("key %q: after %s: %w", name, t, err)
			}
			if t == "algorithm" {
				alg = v
			} else {
				secret = v
			}
		case "":
			return Key{}, fmt.Errorf("key %q: missing }", name)
		default:
			return Key{}, fmt.Errorf("key %q: unknown statement %q", name, t)
		}
	}
}

// tokenize splits BIND config text into words, quoted strings (unquoted) and
// the punctuation { } ;.
func tokenize(s string) ([]string, error) {
	var toks []string
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '#' || (c == '/' && i+1 < len(s) && s[i+1] == '/'):
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '/' && i+1 < len(s) && s[i+1] == '*':
			end := strings.Index(s[i+2:], "*/")
			if end < 0 {
				return nil, fmt.Errorf("unterminated /* comment")
			}
			i += end + 4
		case c == '{' || c == '}' || c == ';':
			toks = append(toks, string(c))
			i++
		case c == '"':
			end := strings.IndexByte(s[i+1:], '"')
			if end < 0 {
				return nil, fmt.Errorf("unterminated string")
			}
			toks = append(toks, s[i+1:i+1+end])
			i += end + 2
		default:
			j := i
			for j < len(s) && !strings.ContainsRune(" \t\r\n{};\"#", rune(s[j])) {
				j++
			}
			if j == i { // a lone '/'
				j++
			}
			toks = append(toks, s[i:j])
			i = j
		}
	}
	return toks, nil
}
