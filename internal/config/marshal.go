package config

import (
	"fmt"
	"net/netip"
	"reflect"

	"go.yaml.in/yaml/v3"
)

// MarshalMigration writes m as a spec file Parse reads back to m: every
// key of the schema, quantities in their own units ("90mbit", "300ms").
// (The lab hands vmhopd the spec it made from a template this way.)
func MarshalMigration(m *Migration) ([]byte, error) {
	return yaml.Marshal(map[string]any{"migration": marshalValue(reflect.ValueOf(*m))})
}

func marshalValue(v reflect.Value) any {
	// Addresses, durations, rates and sizes print as they parse.
	if s, ok := v.Interface().(fmt.Stringer); ok && (v.Kind() != reflect.Struct || v.Type() == addrType) {
		return s.String()
	}
	switch v.Kind() {
	case reflect.Struct:
		out := map[string]any{}
		for i := 0; i < v.NumField(); i++ {
			if name := v.Type().Field(i).Tag.Get("key"); name != "" {
				if a, ok := v.Field(i).Interface().(netip.Addr); ok && !a.IsValid() {
					continue // unset (old_ip6 of an IPv4-only VM): absent, as it was read
				}
				out[name] = marshalValue(v.Field(i))
			}
		}
		return out
	case reflect.Slice:
		out := make([]any, v.Len())
		for i := range out {
			out[i] = marshalValue(v.Index(i))
		}
		return out
	}
	return v.Interface()
}
