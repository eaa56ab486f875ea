#!/usr/bin/env bash
# Freeze the host runtime (shim + kata-runtime) with PyInstaller (--onedir) into OUT/kata-py/.
# usage: freeze-runtime.sh VENV OUT
#   VENV   the project venv (has PyInstaller and the runtime's dependencies)
#   OUT    output directory; the bundle lands in OUT/kata-py/ (replaced atomically), with the
#          entry points as relative symlinks beside it in OUT/kata-py/bin/ (see
#          build/runtime-entry.py: the name a link is run by selects the program)
# OUT/kata-py/BUILD_INFO records the version and the commit (JSON).
set -euo pipefail
die() { echo "freeze-runtime: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 VENV OUT"
venv=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
[ -x "$venv/bin/pyinstaller" ] || die "$venv/bin/pyinstaller not found (make venv)"
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Everything the host side may import lazily (importlib, imports inside functions): our
# packages (not the guest agent), pyroute2 (the netlink worker), the protobuf runtime.
collect=()
for pkg in cli common hostos shim sandbox hypervisors agent_client network ttrpc protocols; do
    collect+=(--collect-submodules "$pkg")
done
collect+=(--collect-submodules pyroute2 --collect-submodules google.protobuf)
if "$venv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
    collect+=(--collect-submodules prometheus_client)
fi
# Development and guest-only modules never belong in the host runtime.
excl=()
for m in agent tests benchmarks pytest _pytest hypothesis grpc grpc_tools mypy ruff \
         PyInstaller setuptools pip tkinter readline pyexpat; do
    excl+=(--exclude-module "$m")
done

tmp="$out/.pyi"
rm -rf "$tmp" "$out/kata-py.new"
mkdir -p "$tmp"
# shellcheck source=build/pyinstaller-onedir.sh
. "$here/pyinstaller-onedir.sh"
pyinstaller_onedir "$venv" "$root" "$tmp" kata-py "$here/runtime-entry.py" "${collect[@]}" "${excl[@]}"
bundle="$tmp/dist/kata-py"
[ -x "$bundle/kata-py" ] || die "PyInstaller produced no $bundle/kata-py"

# Shared libraries Debian 12 ships are taken from the system (the .deb depends on their
# packages, build/debian/control.in), not carried in the bundle: security updates reach
# them, and lintian flags embedded copies. The interpreter's own RUNPATH (the build host's
# Python prefix, e.g. /root/.pyenv/...) is removed: nothing may resolve into the build host.
for lib in libz.so.1 libbz2.so.1.0 liblzma.so.5 libffi.so.8 libssl.so.3 libcrypto.so.3 \
           libsqlite3.so.0 libuuid.so.1 libreadline.so.8 libtinfo.so.6 libstdc++.so.6 \
           libgcc_s.so.1; do
    rm -f "$bundle/_internal/$lib"
done
command -v patchelf >/dev/null || die "patchelf not found (make deps)"
find "$bundle" -type f \( -name '*.so' -o -name '*.so.*' -o -name kata-py \) -print0 \
    | while IFS= read -r -d '' f; do
        if [ -n "$(patchelf --print-rpath "$f" 2>/dev/null)" ]; then patchelf --remove-rpath "$f"; fi
        case "$f" in *.so|*.so.*) chmod 0644 "$f" ;; esac
    done

version=$("$venv/bin/python" -c 'import sys; sys.path.insert(0, sys.argv[1]);
from common.constants import RUNTIME_VERSION; print(RUNTIME_VERSION)' "$root")
commit=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && [ -n "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    commit="$commit-dirty"
fi
printf '{"version": "%s", "commit": "%s"}\n' "$version" "$commit" >"$bundle/BUILD_INFO"

mkdir -p "$bundle/bin"
for e in containerd-shim-kata-v2 containerd-shim-kata-qemu-v2 \
         containerd-shim-kata-qemu-microvm-v2 containerd-shim-kata-stratovirt-v2 kata-runtime; do
    ln -s ../kata-py "$bundle/bin/$e"
done
mv "$bundle" "$out/kata-py.new"
rm -rf "$out/kata-py" "$tmp"
mv "$out/kata-py.new" "$out/kata-py"
echo "freeze-runtime: $(du -sh "$out/kata-py" | cut -f1) in $out/kata-py ($version, $commit)"
