package qemu

import (
	"context"
	"fmt"

	"github.com/vmhop/vmhop/migrator/hypervisor"
)

var _ hypervisor.Recoverable = (*Driver)(nil)

// SourceMigrated implements hypervisor.Recoverable: the source's
// migration completed ("completed"), or the source sits in
// "postmigrate" (its state went to the destination).
func (d *Driver) SourceMigrated(ctx context.Context) (bool, error) {
	if err := d.ConnectSource(ctx); err != nil {
		return false, err
	}
	var q queryMigrate
	if err := d.src.Execute(ctx, "query-migrate", nil, &q); err != nil {
		return false, fmt.Errorf("source: query-migrate: %w", err)
	}
	if q.Status == "completed" {
		return true, nil
	}
	var s queryStatus
	if err := d.src.Execute(ctx, "query-status", nil, &s); err != nil {
		return false, fmt.Errorf("source: query-status: %w", err)
	}
	return s.Status == "postmigrate", nil
}

// CancelMigration implements hypervisor.Recoverable: migrate_cancel
// (QEMU accepts it with no migration running).
func (d *Driver) CancelMigration(ctx context.Context) error {
	if err := d.ConnectSource(ctx); err != nil {
		return err
	}
	if err := d.src.Execute(ctx, "migrate_cancel", nil, nil); err != nil {
		return fmt.Errorf("source: migrate_cancel: %w", err)
	}
	return nil
}

var _ hypervisor.ByteReporter = (*Driver)(nil)

// ReportsBytes implements hypervisor.ByteReporter: query-migrate's
// ram.transferred, every poll.
func (d *Driver) ReportsBytes() bool { return true }
