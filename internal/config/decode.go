package config

import (
	"encoding"
	"fmt"
	"net/netip"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"
)

// FieldError is one problem with one key of a config file.
type FieldError struct {
	Key string // full dotted key, e.g. "migration.network.new_ip"
	Msg string // what is wrong, quoting the bad value
}

func (e FieldError) Error() string { return e.Key + ": " + e.Msg }

// Errors is every problem found in a file. Load reports them all at once, like
// `nginx -t`, so an operator fixes a file in one pass.
type Errors []FieldError

func (es Errors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

func (es *Errors) add(key, format string, args ...any) {
	*es = append(*es, FieldError{Key: key, Msg: fmt.Sprintf(format, args...)})
}

var (
	durationType = reflect.TypeOf(time.Duration(0))
	addrType     = reflect.TypeOf(netip.Addr{})
	textType     = reflect.TypeOf((*encoding.TextUnmarshaler)(nil)).Elem()
)

// decode stores raw (as read by viper from YAML) into v, a value of a struct
// type whose fields carry `key:"name"` tags. Keys absent from raw leave the
// field's default; keys that no field names are errors.
func decode(key string, raw any, v reflect.Value, errs *Errors) {
	if raw == nil {
		return
	}
	t := v.Type()
	if t == addrType {
		s, ok := scalarString(raw)
		a, err := netip.ParseAddr(s)
		if !ok || err != nil {
			errs.add(key, "%s is not an IPv4 or IPv6 address", describe(raw))
			return
		}
		v.Set(reflect.ValueOf(a.Unmap()))
		return
	}
	if reflect.PointerTo(t).Implements(textType) {
		s, ok := scalarString(raw)
		if !ok {
			errs.add(key, "want a string, got %s", describe(raw))
			return
		}
		if err := v.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(s)); err != nil {
			errs.add(key, "%s", trimPrefix(err.Error()))
		}
		return
	}
	switch {
	case t == durationType:
		s, ok := scalarString(raw)
		d, err := time.ParseDuration(s)
		if !ok || err != nil {
			errs.add(key, "%s is not a duration (want e.g. \"300ms\", \"10m\")", describe(raw))
			return
		}
		v.SetInt(int64(d))
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := raw.(map[string]any)
		if !ok {
			errs.add(key, "want a mapping, got %s", describe(raw))
			return
		}
		known := map[string]bool{}
		for i := 0; i < t.NumField(); i++ {
			name := t.Field(i).Tag.Get("key")
			if name == "" {
				continue
			}
			known[name] = true
			if sub, ok := m[name]; ok {
				decode(join(key, name), sub, v.Field(i), errs)
			}
		}
		var unknown []string
		for k := range m {
			if !known[k] {
				unknown = append(unknown, k)
			}
		}
		sort.Strings(unknown)
		for _, k := range unknown {
			errs.add(join(key, k), "unknown key (known: %s)", strings.Join(sortedKeys(known), ", "))
		}
	case reflect.Slice:
		items, ok := raw.([]any)
		if !ok {
			errs.add(key, "want a list, got %s", describe(raw))
			return
		}
		out := reflect.MakeSlice(t, len(items), len(items))
		for i, it := range items {
			decode(fmt.Sprintf("%s[%d]", key, i), it, out.Index(i), errs)
		}
		v.Set(out)
	case reflect.String:
		s, ok := scalarString(raw)
		if !ok {
			errs.add(key, "want a string, got %s", describe(raw))
			return
		}
		v.SetString(s)
	case reflect.Bool:
		b, ok := raw.(bool)
		if !ok {
			errs.add(key, "want true or false, got %s", describe(raw))
			return
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int32, reflect.Int64:
		s, _ := scalarString(raw)
		n, err := strconv.ParseInt(s, 10, t.Bits())
		if err != nil {
			errs.add(key, "%s is not a whole number", describe(raw))
			return
		}
		v.SetInt(n)
	case reflect.Uint, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		s, _ := scalarString(raw)
		n, err := strconv.ParseUint(s, 10, t.Bits())
		if err != nil {
			errs.add(key, "%s is not a whole number from 0 to %d", describe(raw), uint64(1)<<t.Bits()-1)
			return
		}
		v.SetUint(n)
	case reflect.Float64:
		s, _ := scalarString(raw)
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			errs.add(key, "%s is not a number", describe(raw))
			return
		}
		v.SetFloat(f)
	default:
		panic(fmt.Sprintf("config: field %s has unsupported type %s", key, t))
	}
}

// scalarString renders a YAML scalar as the text the user wrote, so numbers
// are accepted where strings are wanted ("port: 53") and vice versa.
func scalarString(raw any) (string, bool) {
	switch x := raw.(type) {
	case string:
		return x, true
	case int, int64, uint64, float64, bool:
		return fmt.Sprint(x), true
	}
	return "", false
}

func describe(raw any) string {
	switch x := raw.(type) {
	case string:
		return strconv.Quote(x)
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	}
	return fmt.Sprint(raw)
}

// trimPrefix drops a Go package prefix like "ParseAddr(...): " that netip adds,
// keeping the message about the value.
func trimPrefix(s string) string {
	if i := strings.Index(s, "): "); i >= 0 && strings.HasPrefix(s, "Parse") {
		return s[i+3:]
	}
	return s
}

func join(prefix, k string) string {
	if k == "" || strings.ContainsAny(k, ". \t\n\"") {
		k = strconv.Quote(k) // keep the dotted path readable for odd YAML keys
	}
	if prefix == "" {
		return k
	}
	return prefix + "." + k
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
