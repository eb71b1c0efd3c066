#!/bin/bash
# Installs the Debian 12 packages vmhop's lab, tests and BPF build need, and
# mounts bpffs. Idempotent; needs root. Go 1.26 must already be on PATH.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(
	iproute2 ethtool            # lab topology
	qemu-system-x86 qemu-utils  # lab guests (TCG)
	busybox-static xz-utils     # guest initramfs
	bind9 bind9-utils bind9-dnsutils knot knot-dnsutils  # DNS servers
	clang llvm libbpf-dev bpftool linux-libc-dev         # BPF (make generate)
	iperf3 tcpdump              # benchmarks, captures
	systemd                     # systemd-analyze verify (the unit's test)
	prometheus                  # promtool check metrics (the /metrics tests)
	dpkg                        # dpkg-deb, dpkg -x (make deb's test)
)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
# Always refresh the lists: the guest build resolves the newest cloud kernel.
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}"
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
