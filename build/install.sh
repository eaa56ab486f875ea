#!/usr/bin/env bash
# Install the runtime on this host (see build/README.md):
#   guest kernel + initrd   -> /usr/share/kata-containers/{vmlinux.container,vmlinuz.container,kata-containers-initrd.img}
#   shared root image       -> /usr/share/kata-containers/kata-containers.img and its loader,
#                              kata-containers-image-loader.img (the default configuration's)
#   default configuration   -> /usr/share/defaults/kata-containers/configuration.toml
#   variant configurations  -> .../configuration-{qemu,qemu-microvm,stratovirt}.toml
#   frozen runtime          -> /usr/libexec/kata-py/ (the onedir bundle of `make runtime`: one
#                              program, kata-py, and its Python runtime; nothing points into
#                              the checkout or needs a Python installation)
#   entry points (symlinks) -> /usr/local/bin/{containerd-shim-kata-v2,kata-runtime} and
#                              containerd-shim-kata-{qemu,qemu-microvm,stratovirt}-v2 (the
#                              shims of io.containerd.kata-<variant>.v2), relative links to
#                              ../../libexec/kata-py/kata-py: the name run selects the program
# usage: install.sh BUNDLE GUEST_DIR    (BUNDLE: build/out/runtime/kata-py; idempotent; as root)
#        install.sh --uninstall         (removes exactly what install.sh installs)
# DESTDIR=/some/root installs below that directory instead of / (for packaging and tests);
# BINDIR=/usr/bin puts the entry points there instead of /usr/local/bin (the .deb does).
set -euo pipefail
die() { echo "install: $*" >&2; exit 1; }

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${DESTDIR:-}
share_dir="$dest/usr/share/kata-containers"
conf_dir="$dest/usr/share/defaults/kata-containers"
bindir=${BINDIR:-/usr/local/bin}
case "$bindir" in /*) ;; *) die "BINDIR must be an absolute path: $bindir" ;; esac
bin_dir="$dest$bindir"
libexec_dir="$dest/usr/libexec/kata-py"
# Relative, so that the links also work below DESTDIR: ../../libexec/... from /usr/local/bin.
link_target=$(realpath -m --relative-to="$bindir" /usr/libexec/kata-py/kata-py)
kernel="$share_dir/vmlinux.container"  # QEMU's (ELF, PVH entry)
bzimage="$share_dir/vmlinuz.container"  # the same kernel as a bzImage: StratoVirt's
initrd="$share_dir/kata-containers-initrd.img"
image="$share_dir/kata-containers.img"
loader="$share_dir/kata-containers-image-loader.img"
config="$conf_dir/configuration.toml"
variants=(qemu qemu-microvm stratovirt)
entry_points=(containerd-shim-kata-v2 kata-runtime)
for v in "${variants[@]}"; do entry_points+=("containerd-shim-kata-$v-v2"); done
variant_config() {  # the repository file a variant's configuration comes from
    if [ "$1" = qemu ]; then echo "$root/configuration.toml"; else echo "$root/configuration-$1.toml"; fi
}

if [ "${1:-}" = "--uninstall" ]; then
    [ $# -eq 1 ] || die "usage: $0 --uninstall"
    rm -f "$kernel" "$bzimage" "$initrd" "$image" "$loader" "$share_dir/MANIFEST" "$config"
    for v in "${variants[@]}"; do rm -f "$conf_dir/configuration-$v.toml"; done
    for e in "${entry_points[@]}"; do
        # only our symlinks: never a file someone else put there
        if [ -L "$bin_dir/$e" ]; then rm -f "$bin_dir/$e"; fi
    done
    # the bundle directory is ours as a whole (its program identifies it)
    if [ -x "$libexec_dir/kata-py" ]; then rm -rf "$libexec_dir"; fi
    rmdir "$share_dir" "$conf_dir" 2>/dev/null || true
    echo "install: removed the runtime from ${dest:-/}"
    exit 0
fi

[ $# -eq 2 ] || die "usage: $0 BUNDLE GUEST_DIR | $0 --uninstall"
bundle=$(cd "$1" 2>/dev/null && pwd) || die "frozen runtime $1 not found (make runtime)"
[ -x "$bundle/kata-py" ] && [ -d "$bundle/_internal" ] \
    || die "$bundle is not the frozen runtime (make runtime builds build/out/runtime/kata-py)"
guest=$(cd "$2" 2>/dev/null && pwd) || die "guest dir $2 not found (make guest)"
[ -z "$dest" ] && [ "$(id -u)" -ne 0 ] && die "run as root (or set DESTDIR)"
for f in vmlinux vmlinuz initrd.img rootfs.img rootfs-loader.img; do
    [ -s "$guest/$f" ] || die "$guest/$f missing (make guest)"
done
[ -f "$root/configuration.toml" ] || die "$root/configuration.toml missing"
for v in "${variants[@]}"; do
    [ -f "$(variant_config "$v")" ] || die "$(variant_config "$v") missing"
done
for e in "${entry_points[@]}"; do  # checked before anything is copied
    if [ -e "$bin_dir/$e" ] && [ ! -L "$bin_dir/$e" ]; then
        die "$bin_dir/$e exists and is not a symlink: not overwriting it"
    fi
done

install -d -m 0755 "$share_dir" "$conf_dir" "$bin_dir" "$dest/usr/libexec"
# The bundle is copied beside the old one and swapped in; its bin/ (links for running it
# from the build tree) is not installed.
rm -rf "$libexec_dir.new"
cp -a "$bundle" "$libexec_dir.new"
rm -rf "$libexec_dir.new/bin"
chmod -R u=rwX,go=rX "$libexec_dir.new"
rm -rf "$libexec_dir"
mv "$libexec_dir.new" "$libexec_dir"
# install(1) writes a temp file and renames: a running VM keeps its old (open) files.
install -m 0644 "$guest/vmlinux" "$kernel"
install -m 0644 "$guest/vmlinuz" "$bzimage"
install -m 0644 "$guest/initrd.img" "$initrd"
# A running VM maps the image it booted with: install(1)'s rename leaves that file intact.
install -m 0644 "$guest/rootfs.img" "$image"
install -m 0644 "$guest/rootfs-loader.img" "$loader"
if [ -f "$guest/MANIFEST" ]; then install -m 0644 "$guest/MANIFEST" "$share_dir/MANIFEST"; fi
install -m 0644 "$root/configuration.toml" "$config"
for v in "${variants[@]}"; do
    install -m 0644 "$(variant_config "$v")" "$conf_dir/configuration-$v.toml"
done
for e in "${entry_points[@]}"; do
    ln -sfn "$link_target" "$bin_dir/$e"
done
echo "install: kernel $kernel, initrd $initrd, image $image (+ loader), config $config," \
    "runtime $libexec_dir," \
    "entry points in $bin_dir -> $link_target"
