#!/usr/bin/env bash
# Freeze the guest agent with PyInstaller (--onedir) into OUT/kata-agent/.
# usage: freeze-agent.sh VENV ENTRY OUT
#   VENV   the project venv (has PyInstaller and the agent's dependencies)
#   ENTRY  the agent's entry script (agent/__main__.py; a stub while testing)
#   OUT    output directory; the bundle lands in OUT/kata-agent/ (replaced atomically)
# The repo root is put on PyInstaller's path so `agent`, `ttrpc` and `protocols` resolve;
# the modules in build/agent-excludes.txt are left out.
set -euo pipefail
die() { echo "freeze-agent: $*" >&2; exit 1; }
[ $# -eq 3 ] || die "usage: $0 VENV ENTRY OUT"
venv=$1 entry=$2 out=$3
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
command -v patchelf >/dev/null || die "patchelf not found (make deps)"
[ -f "$entry" ] || die "agent entry $entry not found (the agent package is agent/__main__.py)"
entry=$(cd "$(dirname "$entry")" && pwd)/$(basename "$entry")
mkdir -p "$out"
out=$(cd "$out" && pwd)
# shellcheck source=build/pyinstaller-onedir.sh
. "$here/pyinstaller-onedir.sh"

# Submodules the agent may import lazily (importlib / inside functions) are collected too.
args=()
add_each args --collect-submodules agent ttrpc protocols common
mapfile -t excluded < <(grep -Ev '^[[:space:]]*(#|$)' "$here/agent-excludes.txt")
add_each args --exclude-module "${excluded[@]}"

pyinstaller_onedir "$venv" "$root" "$out" kata-agent "$entry" "${args[@]}"
drop_unused_libstdcxx "$out/.pyi/dist/kata-agent"
onedir_install "$out" kata-agent
echo "freeze-agent: $(du -sh "$out/kata-agent" | cut -f1) in $out/kata-agent"
