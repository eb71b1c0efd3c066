package daemon

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// Secrets keeps per-migration secrets (QEMU's TLS-PSK, disk-stream
// credentials): one file per secret, STATE_DIR/migrations/ID/NAME, mode
// 0600 in a 0700 directory, written once and never replaced. The host
// that created a migration's directory (this one, or the peer that handed
// a secret over) owns it: only the owner adds to it or removes it.
type Secrets struct {
	dir string // STATE_DIR/migrations
}

// secretNameRE is a migration ID or secret name: one path component.
var secretNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// ownerFile names the owner of a migration's directory (not a valid secret name).
const ownerFile = ".owner"

func checkNames(id, name string) error {
	if !secretNameRE.MatchString(id) {
		return Errorf(CodeInvalidArgument, "migration id %q: want letters, digits, _ . - (at most 128)", id)
	}
	if name != "" && !secretNameRE.MatchString(name) {
		return Errorf(CodeInvalidArgument, "secret name %q: want letters, digits, _ . - (at most 128)", name)
	}
	return nil
}

// Path is the file secret name of migration id is (or will be) stored in.
func (s *Secrets) Path(id, name string) string { return filepath.Join(s.dir, id, name) }

// Create makes a secret of size random bytes (crypto/rand) for migration
// id, owned by owner (this host's name), and stores it.
func (s *Secrets) Create(id, owner, name string, size int) ([]byte, error) {
	b := make([]byte, size)
	rand.Read(b)
	if err := s.Put(id, owner, name, b); err != nil {
		return nil, err
	}
	return b, nil
}

// Put stores value as secret name of migration id, for owner. It refuses
// (CodeAlreadyExists) to replace a secret, and (CodePermissionDenied) to
// add to another owner's migration.
func (s *Secrets) Put(id, owner, name string, value []byte) error {
	if err := checkNames(id, name); err != nil {
		return err
	}
	if name == "" {
		return Errorf(CodeInvalidArgument, "secret name: required")
	}
	if err := s.claim(id, owner); err != nil {
		return err
	}
	f, err := os.OpenFile(s.Path(id, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return Errorf(CodeAlreadyExists, "secret %q of migration %q exists", name, id)
	}
	if err != nil {
		return fmt.Errorf("store secret: %w", err)
	}
	if _, err := f.Write(value); err != nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("store secret: %w", err)
	}
	return f.Close()
}

// claim makes migration id's directory for owner, or checks that owner has it.
func (s *Secrets) claim(id, owner string) error {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fmt.Errorf("make secrets directory: %w", err)
	}
	dir := filepath.Join(s.dir, id)
	err := os.Mkdir(dir, 0o700)
	if err == nil {
		return os.WriteFile(filepath.Join(dir, ownerFile), []byte(owner+"\n"), 0o600)
	}
	if !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("make migration directory: %w", err)
	}
	return s.checkOwner(id, owner)
}

func (s *Secrets) checkOwner(id, owner string) error {
	b, err := os.ReadFile(filepath.Join(s.dir, id, ownerFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Errorf(CodeNotFound, "no secrets for migration %q", id)
	}
	if err != nil {
		return fmt.Errorf("read owner of migration %q: %w", id, err)
	}
	if got := strings.TrimSpace(string(b)); got != owner {
		return Errorf(CodePermissionDenied, "migration %q belongs to %q, not %q", id, got, owner)
	}
	return nil
}

// Read returns secret name of migration id.
func (s *Secrets) Read(id, name string) ([]byte, error) {
	if err := checkNames(id, name); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(s.Path(id, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, Errorf(CodeNotFound, "no secret %q for migration %q", name, id)
	}
	return b, err
}

// Remove deletes every secret of migration id, for its owner. Removing a
// migration that has none is not an error (it is idempotent).
func (s *Secrets) Remove(id, owner string) error {
	if err := checkNames(id, ""); err != nil {
		return err
	}
	if err := s.checkOwner(id, owner); err != nil {
		if CodeOf(err) == CodeNotFound {
			return nil
		}
		return err
	}
	if err := os.RemoveAll(filepath.Join(s.dir, id)); err != nil {
		return fmt.Errorf("remove secrets of migration %q: %w", id, err)
	}
	return nil
}

// sweep removes every migration's secrets: at startup they can only be
// left by a vmhopd that died (migrations do not outlive their daemon). It
// returns the migration IDs it removed.
func (s *Secrets) sweep() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("sweep secrets: %w", err)
	}
	var ids []string
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(s.dir, e.Name())); err != nil {
			return ids, fmt.Errorf("sweep secrets: %w", err)
		}
		ids = append(ids, e.Name())
	}
	return ids, nil
}

// SecretPut is the request of peer method "secret.put": store Value as
// secret Name of migration Migration on the receiving host.
type SecretPut struct {
	Migration string `json:"migration"`
	Name      string `json:"name"`
	Value     []byte `json:"value"` // base64 in JSON
}

// MigrationRef names a migration (peer method "secret.delete").
type MigrationRef struct {
	Migration string `json:"migration"`
}

// Empty is the response of methods that return nothing but success.
type Empty struct{}

func (d *Daemon) registerSecretMethods() {
	Handle(d.peerAPI, "secret.put", func(ctx context.Context, from string, req SecretPut) (Empty, error) {
		err := d.secrets.Put(req.Migration, from, req.Name, req.Value)
		if err == nil {
			d.log.Info("secret handed over", "migration", req.Migration, "name", req.Name, "from", from)
		}
		return Empty{}, err
	})
	Handle(d.peerAPI, "secret.delete", func(ctx context.Context, from string, req MigrationRef) (Empty, error) {
		return Empty{}, d.secrets.Remove(req.Migration, from)
	})
}

// HandOverSecret creates a secret of size random bytes for migration id,
// stores it on this host and on peer (over the peer API, method
// "secret.put"), and returns it. If the peer refuses, this host's copy is
// removed again.
func (d *Daemon) HandOverSecret(ctx context.Context, peer, id, name string, size int) ([]byte, error) {
	c, err := d.Peer(peer)
	if err != nil {
		return nil, err
	}
	b, err := d.secrets.Create(id, d.cfg.Name, name, size)
	if err != nil {
		return nil, fmt.Errorf("hand over secret %q: %w", name, err)
	}
	if _, err := Call[SecretPut, Empty](ctx, c, "secret.put", SecretPut{Migration: id, Name: name, Value: b}); err != nil {
		os.Remove(d.secrets.Path(id, name))
		return nil, fmt.Errorf("hand over secret %q: %w", name, err)
	}
	return b, nil
}

// ForgetSecrets deletes migration id's secrets on peer and on this host.
// Both are attempted; the errors are joined.
func (d *Daemon) ForgetSecrets(ctx context.Context, peer, id string) error {
	var perr error
	if c, err := d.Peer(peer); err != nil {
		perr = err
	} else {
		_, perr = Call[MigrationRef, Empty](ctx, c, "secret.delete", MigrationRef{Migration: id})
	}
	return errors.Join(perr, d.secrets.Remove(id, d.cfg.Name))
}

// Secrets is this host's per-migration secret store.
func (d *Daemon) Secrets() *Secrets { return &d.secrets }
