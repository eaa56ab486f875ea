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

# PyInstaller adds its runtime hook pyi_rth_inspect whenever `inspect` is in the graph
# (dataclasses imports it). That hook imports zipfile (+ pathlib, urllib.parse, ipaddress)
# and reads base_library.zip's name list at every start, only to fix
# inspect.getsourcefile() for frozen code, which the agent never calls: ~25 ms on the host,
# ~0.4 s under TCG. A user hook directory's rthooks.dat takes precedence over the built-in
# one per module, so a no-op hook for `inspect` replaces it.
mkdir -p "$tmp/hooks/rthooks"
echo "{'inspect': ['pyi_rth_kata_noop.py']}" >"$tmp/hooks/rthooks.dat"
echo "# replaces PyInstaller's pyi_rth_inspect (see freeze-agent.sh)" \
    >"$tmp/hooks/rthooks/pyi_rth_kata_noop.py"
(
    cd "$root"
    # PYTHONPATH: PyInstaller's analysis imports hooks in a subprocess; the repo root must
    # resolve there too. -O level 1 keeps docstrings (some code reads __doc__).
    # --debug noarchive: modules are plain .pyc files under _internal/ loaded by the
    # standard path finder, instead of zlib-compressed entries of the PYZ archive (and
    # base_library.zip via zipimport) unpacked by PyInstaller's pure-Python importer:
    # host exec->serving 145 -> 79 ms median (bundle 13 -> 16 MiB); see build/README.md.
    PYTHONPATH="$root" PYTHONDONTWRITEBYTECODE=1 "$venv/bin/pyinstaller" \
        --onedir --noconfirm --clean --log-level WARN \
        --name kata-agent --paths "$root" \
        --distpath "$tmp/dist" --workpath "$tmp/build" --specpath "$tmp" \
        --strip --optimize 1 --debug noarchive \
        --additional-hooks-dir "$tmp/hooks" \
        "${collect[@]}" "${excl[@]}" \
        "$entry"
)
[ -x "$tmp/dist/kata-agent/kata-agent" ] || die "PyInstaller produced no $tmp/dist/kata-agent/kata-agent"
mv "$tmp/dist/kata-agent" "$out/kata-agent.new"
rm -rf "$out/kata-agent" "$tmp"
mv "$out/kata-agent.new" "$out/kata-agent"
echo "freeze-agent: $(du -sh "$out/kata-agent" | cut -f1) in $out/kata-agent"
