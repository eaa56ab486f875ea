# Sourced by build/freeze-agent.sh and build/freeze-runtime.sh: what both frozen programs
# share, from the PyInstaller --onedir call to putting the bundle in place.
#   add_each ARRAY FLAG WORD...        appends FLAG WORD to the array named ARRAY, per WORD
#   pyinstaller_onedir VENV ROOT OUT NAME ENTRY [PYINSTALLER ARGS...]
#                                      builds OUT/.pyi/dist/NAME (OUT/.pyi: PyInstaller's
#                                      work files), ready for changes before it is installed
#   onedir_install OUT NAME            replaces OUT/NAME with it (atomically), removes OUT/.pyi
# OUT must be an absolute path.

add_each() {
    local -n _add_each_to=$1
    local flag=$2 word
    shift 2
    for word in "$@"; do _add_each_to+=("$flag" "$word"); done
}

onedir_install() {
    local out=$1 name=$2
    rm -rf "$out/$name.new"
    mv "$out/.pyi/dist/$name" "$out/$name.new"
    rm -rf "$out/$name" "$out/.pyi"
    mv "$out/$name.new" "$out/$name"
}

pyinstaller_onedir() {
    local venv=$1 root=$2 out=$3 name=$4 entry=$5
    shift 5
    local tmp="$out/.pyi"
    if [ ! -x "$venv/bin/pyinstaller" ]; then
        echo "$venv/bin/pyinstaller not found (make venv)" >&2
        return 1
    fi
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # PyInstaller adds its runtime hook pyi_rth_inspect whenever `inspect` is in the graph
    # (dataclasses imports it). That hook imports zipfile (+ pathlib, urllib.parse,
    # ipaddress) and reads base_library.zip's name list at every start, only to fix
    # inspect.getsourcefile() for frozen code, which we never call: ~25 ms on the host,
    # ~0.4 s under TCG. A user hook directory's rthooks.dat takes precedence over the
    # built-in one per module, so a no-op hook for `inspect` replaces it.
    mkdir -p "$tmp/hooks/rthooks"
    # Likewise pyi_rth_multiprocessing (pyroute2 puts multiprocessing in the graph): it
    # imports multiprocessing and its spawn support (pickle, ...) at every start, for
    # children started by multiprocessing's spawn or forkserver methods, which we never use.
    echo "{'inspect': ['pyi_rth_kata_noop.py'], 'multiprocessing': ['pyi_rth_kata_noop.py']}" \
        >"$tmp/hooks/rthooks.dat"
    echo "# replaces PyInstaller's pyi_rth_inspect and pyi_rth_multiprocessing" \
        >"$tmp/hooks/rthooks/pyi_rth_kata_noop.py"
    (
        cd "$root"
        # PYTHONPATH: PyInstaller's analysis imports hooks in a subprocess; the repo root
        # must resolve there too. -O level: PYI_OPTIMIZE, 1 (no asserts) unless the caller
        # says 2 (no docstrings either).
        # --debug noarchive: modules are plain .pyc files under _internal/ loaded by the
        # standard path finder, instead of zlib-compressed entries of the PYZ archive (and
        # base_library.zip via zipimport) unpacked by PyInstaller's pure-Python importer:
        # agent exec->serving 145 -> 79 ms median on the host (bundle 13 -> 16 MiB); see
        # build/README.md. The shim's `start` and `delete` run once per container.
        PYTHONPATH="$root" PYTHONDONTWRITEBYTECODE=1 "$venv/bin/pyinstaller" \
            --onedir --noconfirm --clean --log-level WARN \
            --name "$name" --paths "$root" \
            --distpath "$tmp/dist" --workpath "$tmp/build" --specpath "$tmp" \
            --strip --optimize "${PYI_OPTIMIZE:-1}" --debug noarchive \
            --additional-hooks-dir "$tmp/hooks" \
            "$@" "$entry"
    )
    if [ ! -x "$tmp/dist/$name/$name" ]; then
        echo "PyInstaller produced no $tmp/dist/$name/$name" >&2
        return 1
    fi
}

# protobuf's upb extension lists libstdc++ as needed but calls none of it (linked with g++
# without --as-needed). Loading it anyway costs every process start ~2,700 relocations and
# the C++ runtime's initialisers (~20x dearer in the guest, under TCG), the initrd 2.2 MiB,
# and each shim process 0.86 MiB of PSS. Remove the entry from objects that import no C++
# symbol, then the library if nothing else needs it.
drop_unused_libstdcxx() {
    local bundle=$1 f users=0
    while IFS= read -r -d '' f; do
        readelf -d "$f" 2>/dev/null | grep -q 'NEEDED.*\[libstdc++\.so\.6\]' || continue
        if nm -D --undefined-only "$f" | grep -qE '@(GLIBCXX|CXXABI)_| _Z'; then
            users=$((users + 1))
        else
            patchelf --remove-needed libstdc++.so.6 "$f"
            echo "${f#"$bundle"/}: unused libstdc++ dependency removed"
        fi
    done < <(find "$bundle/_internal" -type f -name '*.so*' ! -name 'libstdc++.so.6' -print0)
    if [ "$users" -eq 0 ]; then rm -f "$bundle/_internal/libstdc++.so.6"; fi
}
