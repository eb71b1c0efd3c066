package config

import (
	"fmt"
	"strings"

	"go.yaml.in/yaml/v3"
)

// checkKeys reads data as a YAML node tree, before viper flattens it, and
// reports what viper would hide:
//
//   - keys of one mapping that differ only in case ("new_ip", "New_IP"):
//     viper lowercases keys, so the later one would silently replace the
//     earlier (a whole section, if the key opens one);
//   - keys with a dot ("network.new_ip"): viper reads the dot as nesting, so
//     such a key would silently override the nested value.
//
// Both are errors naming the lines involved. A YAML syntax error is returned
// as is.
func checkKeys(data []byte, errs *Errors) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return err
	}
	walkKeys("", &doc, errs)
	return nil
}

func walkKeys(path string, n *yaml.Node, errs *Errors) {
	switch n.Kind {
	case yaml.DocumentNode, yaml.SequenceNode:
		for i, c := range n.Content {
			p := path
			if n.Kind == yaml.SequenceNode {
				p = fmt.Sprintf("%s[%d]", path, i)
			}
			walkKeys(p, c, errs)
		}
	case yaml.MappingNode:
		seen := map[string]*yaml.Node{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Tag == "!!merge" {
				continue // "<<: *anchor" may override on purpose
			}
			lk := strings.ToLower(k.Value)
			key := join(path, lk)
			if first, ok := seen[lk]; ok {
				what := "repeats"
				if first.Value != k.Value {
					what = "differs only in case from"
				}
				errs.add(join(path, k.Value), "line %d %s %q of line %d: one would silently replace the other (keys are case-insensitive)",
					k.Line, what, first.Value, first.Line)
				continue
			}
			seen[lk] = k
			if strings.Contains(k.Value, ".") {
				parent, child, _ := strings.Cut(lk, ".")
				errs.add(key, "line %d: unknown key: a dot does not nest keys here; write %q under %q (%s: {%s: ...})",
					k.Line, child, join(path, parent), parent, child)
				continue
			}
			walkKeys(key, v, errs)
		}
	}
}
