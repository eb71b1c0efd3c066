package guest

import (
	"fmt"
	"os"
	"path/filepath"
)

// ImageDir is where `make guest` puts the guest kernel and initramfs:
// $VMHOP_GUEST_DIR, else /var/cache/vmhop/guest (outside the repository).
func ImageDir() string {
	if d := os.Getenv("VMHOP_GUEST_DIR"); d != "" {
		return d
	}
	return "/var/cache/vmhop/guest"
}

// Image returns the kernel and initramfs paths, or an error saying how to build them.
func Image() (kernel, initrd string, err error) {
	d := ImageDir()
	kernel, initrd = filepath.Join(d, "vmlinuz"), filepath.Join(d, "initrd.img")
	for _, f := range []string{kernel, initrd} {
		if _, err := os.Stat(f); err != nil {
			return "", "", fmt.Errorf("guest image: %w (build it with `make guest`)", err)
		}
	}
	return kernel, initrd, nil
}
