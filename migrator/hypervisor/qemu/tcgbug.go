package qemu

import (
	"context"
	"encoding/json"
	"fmt"
)

// dirtySyncWord is the span of guest RAM one word of QEMU's dirty bitmap
// covers: 64 pages of 4 KiB. A RAM block whose length is a multiple of it
// is synced on QEMU's fast path.
const dirtySyncWord = 64 * 4096

// TCGDirtySyncRisk says whether a QEMU loses guest writes in migrations:
// QEMU before 9.0 under TCG, for a RAM block synced on the fast path, does
// not reset the TLB's dirty state when it syncs the dirty bitmap, so pages
// the guest writes after a sync may never be sent again and the destination
// resumes with stale memory (fixed upstream by commit 03bfc2188f, "physmem:
// Fix migration dirty bitmap coherency with TCG memory access", QEMU 9.0).
// A RAM size that is not a multiple of 256 KiB keeps the sync on the slow
// path, which is correct. KVM is not affected (it has its own dirty log).
// The answer is "" when not at risk, else why.
func TCGDirtySyncRisk(major, minor int, kvm bool, ramBytes uint64) string {
	if kvm || major >= 9 {
		return ""
	}
	if ramBytes%dirtySyncWord != 0 {
		return ""
	}
	return fmt.Sprintf("QEMU %d.%d under TCG with %d KiB of guest RAM (a multiple of 256 KiB) can lose guest memory writes "+
		"in migrations (upstream fix 03bfc2188f, QEMU 9.0): use KVM, QEMU >= 9.0, or a guest RAM size 8 KiB off a multiple "+
		"of 256 KiB (for example -m %dk)", major, minor, ramBytes>>10, ramBytes>>10+8)
}

// Preflight reports what makes a migration to the prepared destination
// unsafe (TCGDirtySyncRisk), as warnings: the migration may still run.
// It asks the destination QEMU (query-version, query-kvm,
// query-memory-size-summary); call it after PrepareDestination.
func (d *Driver) Preflight(ctx context.Context) ([]string, error) {
	if !d.prepared {
		return nil, fmt.Errorf("preflight: no destination prepared")
	}
	var v struct {
		QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
	}
	var k struct {
		Enabled bool `json:"enabled"`
	}
	var m struct {
		Base uint64 `json:"base-memory"`
	}
	for _, c := range []struct {
		cmd string
		out any
	}{{"query-version", &v}, {"query-kvm", &k}, {"query-memory-size-summary", &m}} {
		raw, err := d.in.Query(ctx, Query{Command: c.cmd})
		if err == nil {
			err = json.Unmarshal(raw, c.out)
		}
		if err != nil {
			return nil, fmt.Errorf("preflight: %s: %w", c.cmd, err)
		}
	}
	if w := TCGDirtySyncRisk(v.QEMU.Major, v.QEMU.Minor, k.Enabled, m.Base); w != "" {
		return []string{w}, nil
	}
	return nil, nil
}
