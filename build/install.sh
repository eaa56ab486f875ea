#!/usr/bin/env bash
# Install the runtime on this host (see build/README.md):
#   guest kernel + initrd   -> /usr/share/kata-containers/{vmlinuz.container,kata-containers-initrd.img}
#   default configuration   -> /usr/share/defaults/kata-containers/configuration.toml
#   variant configurations  -> .../configuration-{qemu,qemu-microvm,stratovirt}.toml
#   entry points (symlinks) -> /usr/local/bin/{containerd-shim-kata-v2,kata-runtime} -> VENV/bin/...
#                              and containerd-shim-kata-{qemu,qemu-microvm,stratovirt}-v2 (the
#                              shims of io.containerd.kata-<variant>.v2)
# usage: install.sh VENV GUEST_DIR      (idempotent; run as root)
#        install.sh --uninstall         (removes exactly what install.sh installs)
# DESTDIR=/some/root installs below that directory instead of / (for packaging and tests).
set -euo pipefail
die() { echo "install: $*" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
share_dir="$dest/usr/share/kata-containers"
conf_dir="$dest/usr/share/defaults/kata-containers"
bin_dir="$dest/usr/local/bin"
kernel="$share_dir/vmlinuz.container"
initrd="$share_dir/kata-containers-initrd.img"
config="$conf_dir/configuration.toml"
variants=(qemu qemu-microvm stratovirt)
entry_points=(containerd-shim-kata-v2 kata-runtime)
for v in "${variants[@]}"; do entry_points+=("containerd-shim-kata-$v-v2"); done
variant_config() {  # the repository file a variant's configuration comes from
    if [ "$1" = qemu ]; then echo "$root/configuration.toml"; else echo "$root/configuration-$1.toml"; fi
}

if [ "${1:-}" = "--uninstall" ]; then
    [ $# -eq 1 ] || die "usage: $0 --uninstall"
    rm -f "$kernel" "$initrd" "$share_dir/MANIFEST" "$config"
    for v in "${variants[@]}"; do rm -f "$conf_dir/configuration-$v.toml"; done
    for e in "${entry_points[@]}"; do
        # only our symlinks: never a file someone else put there
        if [ -L "$bin_dir/$e" ]; then rm -f "$bin_dir/$e"; fi
    done
    rmdir "$share_dir" "$conf_dir" 2>/dev/null || true
    echo "install: removed the runtime from ${dest:-/}"
    exit 0
fi

[ $# -eq 2 ] || die "usage: $0 VENV GUEST_DIR | $0 --uninstall"
venv=$(cd "$1" 2>/dev/null && pwd) || die "venv $1 not found (make venv)"
guest=$(cd "$2" 2>/dev/null && pwd) || die "guest dir $2 not found (make guest)"
[ -z "$dest" ] && [ "$(id -u)" -ne 0 ] && die "run as root (or set DESTDIR)"
for f in vmlinuz initrd.img; do
    [ -s "$guest/$f" ] || die "$guest/$f missing (make guest)"
done
[ -f "$root/configuration.toml" ] || die "$root/configuration.toml missing"
for v in "${variants[@]}"; do
    [ -f "$(variant_config "$v")" ] || die "$(variant_config "$v") missing"
done
for e in "${entry_points[@]}"; do
    [ -x "$venv/bin/$e" ] || die "$venv/bin/$e missing (make venv installs the entry points)"
done

install -d -m 0755 "$share_dir" "$conf_dir" "$bin_dir"
# install(1) writes a temp file and renames: a running VM keeps its old (open) files.
install -m 0644 "$guest/vmlinuz" "$kernel"
install -m 0644 "$guest/initrd.img" "$initrd"
if [ -f "$guest/MANIFEST" ]; then install -m 0644 "$guest/MANIFEST" "$share_dir/MANIFEST"; fi
install -m 0644 "$root/configuration.toml" "$config"
for v in "${variants[@]}"; do
    install -m 0644 "$(variant_config "$v")" "$conf_dir/configuration-$v.toml"
done
for e in "${entry_points[@]}"; do
    if [ -e "$bin_dir/$e" ] && [ ! -L "$bin_dir/$e" ]; then
        die "$bin_dir/$e exists and is not a symlink: not overwriting it"
    fi
    ln -sfn "$venv/bin/$e" "$bin_dir/$e"
done
echo "install: kernel $kernel, initrd $initrd, config $config," \
    "entry points in $bin_dir -> $venv/bin"
