package config

import (
	"bytes"
	"fmt"
	"os"
	"reflect"

	"github.com/spf13/viper"
)

// File is a parsed config file: exactly one of Daemon or Migration is set.
type File struct {
	Daemon    *Daemon
	Migration *Migration
}

// Kind names the file's schema: "vmhopd" or "migration".
func (f *File) Kind() string {
	if f.Daemon != nil {
		return "vmhopd"
	}
	return "migration"
}

// Load reads path and returns its contents, or every problem found in it as Errors.
func Load(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data)
}

// LoadMigration is Load for a file that must be a migration spec.
func LoadMigration(path string) (*Migration, error) {
	f, err := Load(path)
	if err != nil {
		return nil, err
	}
	if f.Migration == nil {
		return nil, fmt.Errorf("%s: is a %s config, want a migration spec", path, f.Kind())
	}
	return f.Migration, nil
}

// LoadDaemon is Load for a file that must be a vmhopd config.
func LoadDaemon(path string) (*Daemon, error) {
	f, err := Load(path)
	if err != nil {
		return nil, err
	}
	if f.Daemon == nil {
		return nil, fmt.Errorf("%s: is a %s config, want a vmhopd config", path, f.Kind())
	}
	return f.Daemon, nil
}

// Parse decodes YAML text, applies defaults, and validates it. Keys are
// case-insensitive; two keys of one mapping that differ only in case, and
// dotted keys, are errors (see checkKeys).
func Parse(data []byte) (*File, error) {
	var errs Errors
	if err := checkKeys(data, &errs); err != nil {
		return nil, fmt.Errorf("parse yaml: %w", err)
	}
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
		if len(errs) > 0 {
			return nil, errs // exact repeats: viper stops at what checkKeys named
		}
		return nil, fmt.Errorf("parse yaml: %w", err)
	}
	all := v.AllSettings()
	_, isDaemon := all["vmhopd"]
	_, isMigration := all["migration"]
	for k := range all {
		if k != "vmhopd" && k != "migration" {
			errs.add(join("", k), "unknown top-level key (want \"vmhopd\" or \"migration\")")
		}
	}
	f := &File{}
	switch {
	case isDaemon && isMigration:
		errs.add("vmhopd", "a file holds one kind of config; \"migration\" is here too")
	case isDaemon:
		d := DefaultDaemon()
		decode("vmhopd", all["vmhopd"], reflect.ValueOf(&d).Elem(), &errs)
		var verrs Errors
		d.validate("vmhopd", &verrs)
		errs = merge(errs, verrs)
		f.Daemon = &d
	case isMigration:
		m := DefaultMigration()
		decode("migration", all["migration"], reflect.ValueOf(&m).Elem(), &errs)
		var verrs Errors
		m.validate("migration", &verrs)
		errs = merge(errs, verrs)
		f.Migration = &m
	default:
		if len(errs) == 0 {
			errs.add("(top)", "no \"vmhopd\" or \"migration\" key: not a vmhop config")
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return f, nil
}

// merge appends the validation errors for keys that decoded cleanly: a key
// that could not be decoded is reported once, for what the user wrote.
func merge(decodeErrs, validateErrs Errors) Errors {
	bad := map[string]bool{}
	for _, e := range decodeErrs {
		bad[e.Key] = true
	}
	for _, e := range validateErrs {
		if !bad[e.Key] {
			decodeErrs = append(decodeErrs, e)
		}
	}
	return decodeErrs
}
