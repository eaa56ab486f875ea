# Sourced by build/freeze-agent.sh and build/freeze-runtime.sh: one PyInstaller --onedir
# call with the settings both frozen programs share.
#   pyinstaller_onedir VENV ROOT TMP NAME ENTRY [PYINSTALLER ARGS...]
# The bundle lands in TMP/dist/NAME; TMP also holds PyInstaller's work files.
pyinstaller_onedir() {
    local venv=$1 root=$2 tmp=$3 name=$4 entry=$5
    shift 5
    # PyInstaller adds its runtime hook pyi_rth_inspect whenever `inspect` is in the graph
    # (dataclasses imports it). That hook imports zipfile (+ pathlib, urllib.parse,
    # ipaddress) and reads base_library.zip's name list at every start, only to fix
    # inspect.getsourcefile() for frozen code, which we never call: ~25 ms on the host,
    # ~0.4 s under TCG. A user hook directory's rthooks.dat takes precedence over the
    # built-in one per module, so a no-op hook for `inspect` replaces it.
    mkdir -p "$tmp/hooks/rthooks"
    echo "{'inspect': ['pyi_rth_kata_noop.py']}" >"$tmp/hooks/rthooks.dat"
    echo "# replaces PyInstaller's pyi_rth_inspect (see build/pyinstaller-onedir.sh)" \
        >"$tmp/hooks/rthooks/pyi_rth_kata_noop.py"
    (
        cd "$root"
        # PYTHONPATH: PyInstaller's analysis imports hooks in a subprocess; the repo root
        # must resolve there too. -O level 1 keeps docstrings (some code reads __doc__).
        # --debug noarchive: modules are plain .pyc files under _internal/ loaded by the
        # standard path finder, instead of zlib-compressed entries of the PYZ archive (and
        # base_library.zip via zipimport) unpacked by PyInstaller's pure-Python importer:
        # agent exec->serving 145 -> 79 ms median on the host (bundle 13 -> 16 MiB); see
        # build/README.md. The shim's `start` and `delete` run once per container.
        PYTHONPATH="$root" PYTHONDONTWRITEBYTECODE=1 "$venv/bin/pyinstaller" \
            --onedir --noconfirm --clean --log-level WARN \
            --name "$name" --paths "$root" \
            --distpath "$tmp/dist" --workpath "$tmp/build" --specpath "$tmp" \
            --strip --optimize 1 --debug noarchive \
            --additional-hooks-dir "$tmp/hooks" \
            "$@" "$entry"
    )
}
