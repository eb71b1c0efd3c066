package config

import (
	"fmt"
	"net/netip"
	"reflect"
	"strconv"
	"time"

	"github.com/vmhop/vmhop/internal/units"
)

// Setting is one effective value of a config file: what the file says, or
// the default where it says nothing.
type Setting struct {
	Key   string // full dotted key, e.g. "migration.limits.bandwidth"
	Value string // with its unit, e.g. "90mbit (90000000 bit/s = 11.25 MB/s)"
}

// Effective lists every key of the file's schema with the value vmhop will
// use, in schema order. Rates print in bits and bytes per second, sizes in
// bytes, durations with their unit, plain numbers with the unit of their
// `unit` tag ("seconds", "passes").
func (f *File) Effective() []Setting {
	var out []Setting
	if f.Daemon != nil {
		effective("vmhopd", reflect.ValueOf(*f.Daemon), "", &out)
	} else if f.Migration != nil {
		effective("migration", reflect.ValueOf(*f.Migration), "", &out)
	}
	return out
}

func effective(key string, v reflect.Value, unit string, out *[]Setting) {
	if v.Kind() == reflect.Struct && v.Type() != addrType {
		for i := 0; i < v.NumField(); i++ {
			f := v.Type().Field(i)
			if name := f.Tag.Get("key"); name != "" {
				effective(join(key, name), v.Field(i), f.Tag.Get("unit"), out)
			}
		}
		return
	}
	var s string
	switch x := v.Interface().(type) {
	case units.Bitrate:
		s = x.Explain()
	case units.ByteSize:
		s = x.Explain()
	case time.Duration:
		s = x.String()
	case netip.Addr:
		s = x.String()
		if !x.IsValid() {
			s = "(none)"
		}
	case string:
		s = strconv.Quote(x)
	default:
		s = fmt.Sprint(x)
		if unit != "" {
			s += " " + unit
		}
	}
	*out = append(*out, Setting{Key: key, Value: s})
}
