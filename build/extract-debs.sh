#!/usr/bin/env bash
# Unpack the packages named in CACHE/debs.lock into WORK/debs/<package>/ (dpkg-deb -x; nothing
# is installed) and run depmod on the kernel tree so modules.dep exists.
# usage: extract-debs.sh CACHE WORK
set -euo pipefail
die() { echo "extract-debs: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 CACHE WORK"
cache=$1 work=$2
lock="$cache/debs.lock"
[ -f "$lock" ] || die "$lock missing (run fetch-debs.sh)"
depmod=$(command -v depmod || echo /sbin/depmod)
[ -x "$depmod" ] || die "depmod not found: apt-get install kmod (build/host-deps.sh)"
mkdir -p "$work/debs"
while read -r pkg ver file _; do
    case "$pkg" in ''|'#'*) continue ;; esac
    [ -f "$cache/$file" ] || die "$cache/$file missing (run fetch-debs.sh)"
    dst="$work/debs/$pkg"
    case "$pkg" in linux-image-*) dst="$work/debs/linux-image" ;; esac  # versioned name
    rm -rf "$dst.new"
    mkdir -p "$dst.new"
    dpkg-deb -x "$cache/$file" "$dst.new"
    echo "$pkg $ver" >"$dst.new/.version"
    rm -rf "$dst"
    mv "$dst.new" "$dst"
done <"$lock"
kroot="$work/debs/linux-image"
[ -d "$kroot/lib/modules" ] || die "no kernel package in $lock"
rels=("$kroot"/lib/modules/*)
[ ${#rels[@]} -eq 1 ] || die "expected one kernel release in $kroot/lib/modules"
rel=$(basename "${rels[0]}")
"$depmod" -b "$kroot" "$rel"
[ -f "$kroot/boot/vmlinuz-$rel" ] || die "$kroot/boot/vmlinuz-$rel missing"
echo "$rel" >"$work/debs/kernel-release"
echo "extract-debs: kernel $rel"
