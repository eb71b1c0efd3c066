#!/bin/bash
# Builds the lab guest: a Debian cloud kernel and a busybox initramfs holding
# the virtio modules and vmhop-guest. Output: $OUT/vmlinuz, $OUT/initrd.img.
# Needs: apt-get (the kernel package is downloaded, never installed),
# dpkg-deb, busybox-static, go. Usage: build.sh OUT_DIR
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=$(dirname "$out")/deb
mkdir -p "$out" "$cache"

# The newest cloud kernel the archive offers; the metapackage names it.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
	echo "build.sh: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2
	exit 1
fi
deb=$(ls "$cache"/"$kpkg"_*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
	(cd "$cache" && apt-get download "$kpkg" >/dev/null)
	deb=$(ls "$cache"/"$kpkg"_*.deb | head -1)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/k"
kver=${kpkg#linux-image-}
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net virtio_blk; do
	f=$(find "$work/k/lib/modules/$kver" -name "$m.ko*" | head -1)
	[ -n "$f" ] || { echo "build.sh: module $m not in $kpkg" >&2; exit 1; }
	case "$f" in
	*.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
	*) cp "$f" "$root/lib/modules/$m.ko" ;;
	esac
done
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$root/bin/vmhop-guest" ./cmd/vmhop-guest)
install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.img"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
mv "$work/vmlinuz" "$out/vmlinuz"
echo "$kpkg" >"$out/kernel"
echo "guest image: $out (kernel $kver, initrd $(du -h "$out/initrd.img" | cut -f1))"
