#!/usr/bin/env bash
# Build the Debian package kata-py_<version>_amd64.deb (see build/README.md):
#   /usr/libexec/kata-py/                      the frozen runtime (make runtime)
#   /usr/bin/{containerd-shim-kata-v2,...,kata-runtime}  symlinks to it
#   /usr/share/kata-containers/                guest kernel, initrd, MANIFEST (make guest)
#   /usr/share/defaults/kata-containers/       configuration.toml and the variants'
#   /usr/share/kata-py/containerd/kata.toml    containerd CRI snippet (an `imports` file)
#   /usr/share/doc/kata-py/                    copyright, changelog
#   /usr/share/lintian/overrides/kata-py       why the frozen bundle's .pyc files are fine
# The layout is install.sh's (DESTDIR, BINDIR=/usr/bin), so `make install` and the package
# install the same files.
# usage: deb.sh BUNDLE GUEST_DIR VENV OUT_DIR      (prints the .deb's path last)
set -euo pipefail
die() { echo "deb: $*" >&2; exit 1; }
[ $# -eq 4 ] || die "usage: $0 BUNDLE GUEST_DIR VENV OUT_DIR"
bundle=$1 guest=$2 venv=$3 out=$4
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
[ -f "$bundle/BUILD_INFO" ] || die "$bundle/BUILD_INFO missing (make runtime)"
version=$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$bundle/BUILD_INFO")
mkdir -p "$out"
out=$(cd "$out" && pwd)
stage="$out/.deb-stage"
rm -rf "$stage"
mkdir -p "$stage"

DESTDIR="$stage" BINDIR=/usr/bin "$here/install.sh" "$bundle" "$guest" >/dev/null

snippet="$stage/usr/share/kata-py/containerd/kata.toml"
install -d -m 0755 "$(dirname "$snippet")"
{
    echo "# containerd CRI runtime handler 'kata' for containerd-shim-kata-v2 (kata-py)."
    echo "# Use it with imports = [\"/usr/share/kata-py/containerd/kata.toml\"] in"
    echo "# /etc/containerd/config.toml, or run: kata-runtime containerd-config add"
    echo "version = 2"
    PYTHONPATH="$root" "$venv/bin/python" -c '
import sys
from cli.containerd_config import Handler, handler_block
sys.stdout.write(handler_block(Handler(), with_default_runc=True))'
} >"$snippet"
chmod 0644 "$snippet"

doc="$stage/usr/share/doc/kata-py"
install -d -m 0755 "$doc"
install -m 0644 "$here/debian/copyright" "$doc/copyright"
# The changelog's date is the commit's (reproducible), not the build's.
date=$(git -C "$root" log -1 --format=%cD 2>/dev/null || date -R)
sed -e "s|@VERSION@|$version|" -e "s|@DATE@|$date|" "$here/debian/changelog.in" \
    | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

overrides="$stage/usr/share/lintian/overrides"
install -d -m 0755 "$overrides"
install -m 0644 "$here/debian/lintian-overrides" "$overrides/kata-py"

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
install -d -m 0755 "$stage/DEBIAN"
sed -e "s|@VERSION@|$version|" -e "s|@SIZE@|$size|" "$here/debian/control.in" \
    >"$stage/DEBIAN/control"
# Every file's checksum: what `dpkg --verify` compares against.
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/md5sums"
find "$stage" -type d -exec chmod 0755 {} +

deb="$out/kata-py_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb.tmp" >/dev/null
mv "$deb.tmp" "$deb"
rm -rf "$stage"
echo "deb: $(du -h "$deb" | cut -f1) $deb"
echo "$deb"
