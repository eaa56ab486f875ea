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
[ -x "$venv/bin/pyinstaller" ] || die "$venv/bin/pyinstaller not found (make venv)"
[ -f "$entry" ] || die "agent entry $entry not found (the agent package is agent/__main__.py)"
entry=$(cd "$(dirname "$entry")" && pwd)/$(basename "$entry")
mkdir -p "$out"
out=$(cd "$out" && pwd)

excl=()
while read -r m; do
    case "$m" in ''|'#'*) continue ;; esac
    excl+=(--exclude-module "$m")
done <"$here/agent-excludes.txt"

# Submodules the agent may import lazily (importlib / inside functions) are collected too.
collect=()
for pkg in agent ttrpc protocols common; do
    [ -f "$root/$pkg/__init__.py" ] && collect+=(--collect-submodules "$pkg")
done

tmp="$out/.pyi"
rm -rf "$tmp" "$out/kata-agent.new"
mkdir -p "$tmp"
# shellcheck source=build/pyinstaller-onedir.sh
. "$here/pyinstaller-onedir.sh"
pyinstaller_onedir "$venv" "$root" "$tmp" kata-agent "$entry" "${collect[@]}" "${excl[@]}"
[ -x "$tmp/dist/kata-agent/kata-agent" ] || die "PyInstaller produced no $tmp/dist/kata-agent/kata-agent"
mv "$tmp/dist/kata-agent" "$out/kata-agent.new"
rm -rf "$out/kata-agent" "$tmp"
mv "$out/kata-agent.new" "$out/kata-agent"
echo "freeze-agent: $(du -sh "$out/kata-agent" | cut -f1) in $out/kata-agent"
