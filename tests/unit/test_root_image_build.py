"""The shared root image and its loader initrd (build/rootimage.py): the build's logic on
small inputs, then checks on what `make guest` built ($KATA_GUEST_DIR, default build/out).
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_guest_build import GUEST_DIR, ROOT, _elf_sections, _load, _need, _needed, gb

ri = _load("rootimage")
Entry = Any  # guestbuild.CpioEntry


def debugfs_cat(image: Path, path: str) -> bytes:
    """A file's bytes from an ext4 image, read without mounting it."""
    res = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                         check=True, timeout=60)
    return res.stdout


def superblock(image: Path) -> tuple[int, int, int]:
    """(magic, block size, compat features) of an ext4 image."""
    with image.open("rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    (log_block,) = struct.unpack_from("<I", sb, 24)
    (magic,) = struct.unpack_from("<H", sb, 56)
    (compat,) = struct.unpack_from("<I", sb, 92)
    return magic, 1024 << log_block, compat


EXT4_MAGIC = 0xEF53
HAS_JOURNAL = 0x4


# --------------------------------------------------------------------------- logic


@pytest.mark.parametrize(("tree_bytes", "mib"), [(0, 128), (1, 128), (21355822, 128),
                                                 (96 * 2**20, 128), (97 * 2**20, 256)])
def test_image_size_leaves_room_and_is_aligned(tree_bytes: int, mib: int) -> None:
    assert ri.image_mib(tree_bytes) == mib
    assert mib % ri.ALIGN_MIB == 0 and mib * 2**20 >= tree_bytes * 5 // 4


def _fake_kernel(root: Path) -> Path:
    rel = root / "lib/modules/6.1.0-test"
    deps = {"kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio.ko"],
            "kernel/drivers/virtio/virtio.ko": [],
            "kernel/drivers/nvdimm/virtio_pmem.ko": ["kernel/drivers/nvdimm/nd_virtio.ko",
                                                     "kernel/drivers/nvdimm/libnvdimm.ko"],
            "kernel/drivers/nvdimm/nd_virtio.ko": ["kernel/drivers/nvdimm/libnvdimm.ko"],
            "kernel/drivers/nvdimm/nd_pmem.ko": ["kernel/drivers/nvdimm/libnvdimm.ko"],
            "kernel/drivers/nvdimm/libnvdimm.ko": []}
    for path in deps:
        (rel / path).parent.mkdir(parents=True, exist_ok=True)
        (rel / path).write_bytes(b"\x7fELF" + path.encode())
    (rel / "modules.dep").write_text("".join(f"{p}: {' '.join(d)}\n" for p, d in deps.items()))
    return root


def test_the_loader_initrd_has_its_init_and_the_modules_to_reach_the_image(
        tmp_path: Path) -> None:
    loader = tmp_path / "rootfs-loader"
    loader.write_bytes(b"\x7fELF-loader")
    entries = {e.name: e for e in ri.loader_entries(_fake_kernel(tmp_path / "k"), loader)}
    assert entries["init"].data == b"\x7fELF-loader" and entries["init"].mode == 0o100755
    listing = entries["loader.modules"].data.decode().splitlines()
    # Dependencies first; each module's file beside it, named by its module name.
    assert listing == ["/virtio.ko", "/virtio_pci.ko", "/libnvdimm.ko", "/nd_virtio.ko",
                       "/virtio_pmem.ko", "/nd_pmem.ko"]
    for path in listing:
        assert entries[path[1:]].data.startswith(b"\x7fELF")
    # The mount point, /dev for devtmpfs, and the console the kernel opens for /init.
    assert entries["newroot"].mode == 0o40755 and entries["dev"].mode == 0o40755
    assert "dev/console" in entries


def test_the_image_holds_the_tree_read_back_without_mounting(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "init").write_text("#!/bin/sh\n")
    (tree / "etc/hostname").write_text("kata\n")
    (tree / "bin").mkdir()
    (tree / "bin/sh").symlink_to("busybox")
    out = tmp_path / "rootfs.img"
    mib = ri.write_image(tree, out)
    assert out.stat().st_size == mib * 2**20
    assert out.stat().st_blocks * 512 < 8 * 2**20, "the image should be sparse"
    magic, block, compat = superblock(out)
    assert (magic, block, compat & HAS_JOURNAL) == (EXT4_MAGIC, 4096, 0)
    assert debugfs_cat(out, "/etc/hostname") == b"kata\n"
    assert not out.with_name("rootfs.img.tmp").exists()


def test_no_tree_no_image(tmp_path: Path) -> None:
    with pytest.raises(gb.BuildError, match="no guest tree"):
        ri.write_image(tmp_path / "absent", tmp_path / "rootfs.img")


# --------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def loader_initrd() -> dict[str, Entry]:
    data = _need(GUEST_DIR / "rootfs-loader.img").read_bytes()
    return {"/" + e.name: e for e in gb.read_cpio(data)}


def test_the_built_loader_is_static_and_its_modules_match_the_kernel(
        loader_initrd: dict[str, Entry]) -> None:
    release = _need(GUEST_DIR / "kernel-release").read_text().strip()
    init = loader_initrd["/init"].data
    assert _needed(init) == ([], None), "the loader must be static: its initrd has no libc"
    listing = loader_initrd["/loader.modules"].data.decode().splitlines()
    names = [gb.module_name(p) for p in listing]
    for want in ri.LOADER_MODULES:
        assert want in names, f"{want} missing from loader.modules"
    for i, path in enumerate(listing):
        modinfo = _elf_sections(loader_initrd[path].data)[".modinfo"].split(b"\0")
        vermagic = [f for f in modinfo if f.startswith(b"vermagic=")]
        assert vermagic and vermagic[0].split(b"=")[1].split()[0].decode() == release, path
        deps = [f.split(b"=", 1)[1].decode() for f in modinfo if f.startswith(b"depends=")]
        for dep in deps[0].split(",") if deps and deps[0] else []:
            assert dep.replace("-", "_") in names[:i], f"{names[i]} needs {dep} first"


def test_the_built_image_is_the_initrds_tree_as_ext4_for_dax() -> None:
    image = _need(GUEST_DIR / "rootfs.img")
    magic, block, compat = superblock(image)
    # DAX needs the block size to be the page size; a journal would never be written.
    assert (magic, block, compat & HAS_JOURNAL) == (EXT4_MAGIC, 4096, 0)
    assert image.stat().st_size % (ri.ALIGN_MIB << 20) == 0
    initrd = {"/" + e.name: e for e in
              gb.read_cpio(gb.decompress_any(_need(GUEST_DIR / "initrd.img").read_bytes()))}
    for path in ("/init", "/etc/kata-agent/modules.list", "/etc/kata-agent/modules.virtio"):
        assert debugfs_cat(image, path) == initrd[path].data, path
    assert debugfs_cat(image, "/init") == (ROOT / "build/init.sh").read_bytes()
    agent = "/opt/kata-agent/kata-agent"
    assert debugfs_cat(image, agent) == initrd[agent].data
