#!/usr/bin/env bash
# Install the Debian 12 packages the runtime, its build and its tests need.
# Idempotent: does nothing when every package is already installed.
set -euo pipefail
pkgs=(qemu-system-x86 containerd runc crun busybox-static containernetworking-plugins
      iproute2 cpio python3-venv zstd
      lz4    # the guest kernel's payload, uncompressed into vmlinux (build/guestbuild.py)
      kmod   # kmod: depmod for the guest kernel modules (build/extract-debs.sh)
      gcc libc6-dev  # the guest's crun-only libsystemd, the static root image loader
      e2fsprogs  # mke2fs: the shared root image (build/rootimage.py)
      lintian patchelf)  # `make deb` (checks the package) and `make runtime` (build/freeze-runtime.sh)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
