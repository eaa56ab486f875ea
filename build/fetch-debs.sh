#!/usr/bin/env bash
# Download the Debian packages the guest image is built from into CACHE (build/cache) and
# write CACHE/debs.lock: "package version file" per line. Idempotent: a .deb already in the
# cache is not downloaded again. Refresh to newer packages: `make -f build/guest.mk refresh`.
# usage: fetch-debs.sh CACHE
set -euo pipefail
die() { echo "fetch-debs: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 CACHE"
cache=$1
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# linux-image-cloud-amd64 is a metapackage: resolve it to the versioned image package.
wanted=(linux-image-cloud-amd64 busybox-static crun)
command -v apt-get >/dev/null || die "apt-get not found (Debian 12 host expected)"

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
updated=0
ensure_lists() {  # run apt-get update once when a package has no candidate
    if [ "$updated" -eq 0 ]; then
        echo "fetch-debs: apt-get update" >&2
        apt-get update -qq || die "apt-get update failed"
        updated=1
    fi
}
resolve() {  # package -> concrete package name
    local p=$1 dep
    if [ "$p" = linux-image-cloud-amd64 ]; then
        dep=$(apt-cache depends "$p" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        if [ -z "$dep" ]; then ensure_lists
            dep=$(apt-cache depends "$p" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
        fi
        [ -n "$dep" ] || die "cannot resolve $p to a kernel image package"
        echo "$dep"
    else
        echo "$p"
    fi
}

lock="$cache/debs.lock.tmp"
: >"$lock"
for want in "${wanted[@]}"; do
    pkg=$(resolve "$want")
    ver=$(candidate "$pkg")
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then ensure_lists; ver=$(candidate "$pkg"); fi
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no installable version of $pkg"
    # apt names files pkg_version_arch.deb with ':' (epoch) encoded as %3a
    file=$(ls "$cache/${pkg}_${ver/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$file" ]; then
        echo "fetch-debs: downloading $pkg $ver" >&2
        (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null) \
            || { ensure_lists; (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null); } \
            || die "apt-get download $pkg=$ver failed"
        file=$(ls "$cache/${pkg}_${ver/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
        [ -n "$file" ] || die "downloaded $pkg but found no .deb in $cache"
    fi
    got=$(dpkg-deb -f "$file" Package)
    [ "$got" = "$pkg" ] || die "$file holds $got, not $pkg"
    echo "$pkg $ver $(basename "$file") # for $want" >>"$lock"
done
# Replace the lock only when it changed, so make sees no new input otherwise.
if cmp -s "$lock" "$cache/debs.lock"; then rm -f "$lock"; else mv "$lock" "$cache/debs.lock"; fi
cat "$cache/debs.lock"
