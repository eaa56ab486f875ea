#!/usr/bin/env python3
"""The shared read-only root image and its loader initrd, for ``make guest``.

Subcommands:
  image   the guest tree (the one the full initrd is made of) as an ext4 image the VMs map
          read-only through virtio-pmem and mount with DAX (build/README.md, "Shared root
          image")
  loader  the small initrd that boots it: build/rootfs-loader.c as /init, the modules it
          needs to reach the image, and their list

Only the standard library and mke2fs (e2fsprogs) are used.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guestbuild

#: What the loader loads to reach /dev/pmem0 (their dependencies come from modules.dep):
#: the PCI transport, the virtio-pmem device and the region driver that makes the disk.
LOADER_MODULES = ("virtio_pci", "virtio_pmem", "nd_pmem")
LOADER_LIST = "loader.modules"
#: Free space left in the image beyond its files (MiB): none is needed (it is mounted
#: read-only), but mke2fs wants room for its own metadata.
SLACK_MIB = 8
#: The image's size is a multiple of the guest's memory block (128 MiB on x86-64): it
#: takes a memory-device slot, and a DIMM hot-plugged after it must start on a block
#: boundary or the guest cannot add it (seen: a pod grown from a template got none of its
#: DIMM). The file is sparse: the unused part costs no disk and is never read.
ALIGN_MIB = 128


def image_mib(tree_bytes: int) -> int:
    """The image size for a tree of ``tree_bytes``: files + 25 % + slack, aligned."""
    mib = -(-tree_bytes * 5 // 4 // (1 << 20)) + SLACK_MIB
    return -(-mib // ALIGN_MIB) * ALIGN_MIB


def tree_bytes(tree: Path) -> int:
    return sum(p.lstat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


def write_image(tree: Path, out: Path) -> int:
    """``tree`` as ext4 (4 KiB blocks, as DAX needs; no journal: never written) in ``out``;
    its size in MiB."""
    if not (tree / "init").is_file():
        raise guestbuild.BuildError(f"{tree}: no guest tree (build the initrd first)")
    mib = image_mib(tree_bytes(tree))
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-O", "^has_journal",
                    "-L", "kata-root", "-E", "root_owner=0:0", "-d", str(tree),
                    str(tmp), f"{mib}M"], check=True, stdout=subprocess.DEVNULL)
    tmp.chmod(0o644)
    tmp.replace(out)
    return mib


def loader_entries(kernel_root: Path, loader: Path) -> list[guestbuild.CpioEntry]:
    """The loader initrd's entries: /init, the modules with their list, /dev, /newroot."""
    src_dir, deps, builtin = guestbuild.kernel_modules(kernel_root)
    order, _ = guestbuild.module_closure(list(LOADER_MODULES), deps, builtin)
    entries = [guestbuild.CpioEntry("dev", 0o40755), guestbuild.CpioEntry("newroot", 0o40755),
               guestbuild.CpioEntry("init", 0o100755, loader.read_bytes())]
    paths = []
    for path in order:
        name = f"{guestbuild.module_name(path)}.ko"
        paths.append(f"/{name}")
        entries.append(guestbuild.CpioEntry(name, 0o100644,
                                            guestbuild.read_module(src_dir / path)))
    entries.append(guestbuild.CpioEntry(LOADER_LIST, 0o100644,
                                        "".join(p + "\n" for p in paths).encode()))
    return [*entries, *guestbuild.INIT_DEVICES]


def write_loader(kernel_root: Path, loader: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        guestbuild.write_cpio(f, loader_entries(kernel_root, loader))
    tmp.replace(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rootimage", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    img = sub.add_parser("image")
    img.add_argument("--tree", required=True, help="the guest tree (guestbuild.py initrd)")
    img.add_argument("--out", required=True)
    ld = sub.add_parser("loader")
    ld.add_argument("--kernel-root", required=True, help="extracted kernel package (depmod run)")
    ld.add_argument("--loader", required=True, help="the static rootfs-loader binary")
    ld.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.cmd == "image":
            mib = write_image(Path(args.tree), out)
            print(f"rootimage: {out} {mib} MiB")
        else:
            write_loader(Path(args.kernel_root), Path(args.loader), out)
            print(f"rootimage: {out} {out.stat().st_size / 2**20:.1f} MiB")
    except (guestbuild.BuildError, subprocess.CalledProcessError, OSError) as exc:
        print(f"rootimage: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
