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
command -v patchelf >/dev/null || die "patchelf not found (make deps)"
mkdir -p "$out"
out=$(cd "$out" && pwd)
# shellcheck source=build/pyinstaller-onedir.sh
. "$here/pyinstaller-onedir.sh"

# Everything the host side may import lazily (importlib, imports inside functions): our
# packages (not the guest agent), pyroute2 (the netlink worker), the protobuf runtime.
args=()
add_each args --collect-submodules cli common hostos shim sandbox hypervisors agent_client \
    network ttrpc protocols pyroute2 google.protobuf
if "$venv/bin/python" -c 'import prometheus_client' 2>/dev/null; then
    add_each args --collect-submodules prometheus_client
fi
# Development and guest-only modules never belong in the host runtime (numpy: protobuf imports
# it lazily for __array__; it is in the venv for the benchmarks' charts only).
add_each args --exclude-module agent tests benchmarks pytest _pytest hypothesis grpc \
    grpc_tools mypy ruff PyInstaller setuptools pip tkinter readline pyexpat numpy matplotlib

# -OO: no docstrings in the code objects, -1 MiB of PSS per shim daemon (nothing of ours or
# of what we bundle needs them: the CLI's help is written out, not read from __doc__).
PYI_OPTIMIZE=2 pyinstaller_onedir "$venv" "$root" "$out" kata-py "$here/runtime-entry.py" \
    "${args[@]}"
bundle="$out/.pyi/dist/kata-py"
drop_unused_libstdcxx "$bundle"

# Shared libraries Debian 12 ships are taken from the system (the .deb depends on their
# packages, build/debian/control.in), not carried in the bundle: security updates reach
# them, and lintian flags embedded copies. The interpreter's own RUNPATH (the build host's
# Python prefix, e.g. /root/.pyenv/...) is removed: nothing may resolve into the build host.
for lib in libz.so.1 libbz2.so.1.0 liblzma.so.5 libffi.so.8 libssl.so.3 libcrypto.so.3 \
           libsqlite3.so.0 libuuid.so.1 libreadline.so.8 libtinfo.so.6 libstdc++.so.6 \
           libgcc_s.so.1; do
    rm -f "$bundle/_internal/$lib"
done
find "$bundle" -type f \( -name '*.so' -o -name '*.so.*' -o -name kata-py \) -print0 \
    | while IFS= read -r -d '' f; do
        if [ -n "$(patchelf --print-rpath "$f" 2>/dev/null)" ]; then patchelf --remove-rpath "$f"; fi
        case "$f" in *.so|*.so.*) chmod 0644 "$f" ;; esac
    done

# The version and commit as the runtime reports them without a BUILD_INFO (common/buildinfo.py:
# git's HEAD, -dirty when tracked files changed, without rewriting the shared index).
PYTHONPATH="$root" PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -c '
import json
from common import buildinfo
commit = buildinfo.git_commit() or buildinfo.UNKNOWN
print(json.dumps({"version": buildinfo.RUNTIME_VERSION, "commit": commit}))' >"$bundle/BUILD_INFO"

# A cached VM's holder (hostos/holder.c, built by `make venv`), beside kata-py
# (hostos/holder.py looks there).
[ -x "$venv/bin/kata-vm-holder" ] || die "$venv/bin/kata-vm-holder not found (make venv)"
install -m 0755 "$venv/bin/kata-vm-holder" "$bundle/kata-vm-holder"
mkdir -p "$bundle/bin"
for e in containerd-shim-kata-v2 containerd-shim-kata-qemu-v2 \
         containerd-shim-kata-qemu-microvm-v2 containerd-shim-kata-stratovirt-v2 kata-runtime; do
    ln -s ../kata-py "$bundle/bin/$e"
done
onedir_install "$out" kata-py
echo "freeze-runtime: $(du -sh "$out/kata-py" | cut -f1) in $out/kata-py:" \
    "$(cat "$out/kata-py/BUILD_INFO")"
