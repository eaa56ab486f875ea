"""Host storage against a hostile guest: the guest's view is read-only above the rootfs,
no host operation follows a link planted in the tree, read-only volumes are read-only all
the way down, and unmounting a volume leaves the host's own submounts alone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.mountopts import MS_BIND
from hostos import syscalls
from sandbox import storage
from sandbox.types import Mount


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    storage.unmount_tree(tmp_path)
    assert storage.mounts_under(tmp_path) == []


def test_the_guest_view_is_read_only_but_rootfs_below_it_is_not(tree: Path) -> None:
    mounts, shared = tree / "mounts", tree / "shared"
    storage.prepare_share(mounts, shared)
    source = tree / "snapshot"
    source.mkdir()
    storage.bind_path(source, mounts, "containers/c1/rootfs", readonly=False)
    # Mounted after the view was made: it appears there through propagation.
    assert (shared / "containers/c1/rootfs").is_dir()
    (shared / "containers/c1/rootfs/written-by-guest").write_text("ok")
    assert (source / "written-by-guest").read_text() == "ok"
    for attempt in (lambda: (shared / "filler").write_text("x"),
                    lambda: (shared / "containers/filler").mkdir(),
                    lambda: os.rename(shared / "containers/c1", shared / "moved"),
                    lambda: (shared / "containers/c2").symlink_to("/etc")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == 30  # EROFS
    storage.unmount_tree(mounts / "containers/c1")
    assert not [m for m in storage.mounts_under(tree) if "containers" in m]  # both views


def test_remove_tree_never_follows_a_planted_link(tree: Path) -> None:
    victim = tree / "host-data"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    box = tree / "box"
    (box / "containers").mkdir(parents=True)
    (box / "containers" / "c1").symlink_to(victim)  # a directory replaced by a link
    (box / "containers" / "file-link").symlink_to(victim / "precious")
    storage.remove_tree(box)
    assert not box.exists()
    assert (victim / "precious").read_text() == "keep"
    link = tree / "top-link"
    link.symlink_to(victim)
    storage.remove_tree(link)  # the link itself goes; what it points at stays
    assert not link.is_symlink() and (victim / "precious").exists()


def test_remove_tree_refuses_mounts_and_other_filesystems(tree: Path) -> None:
    (tree / "box" / "m").mkdir(parents=True)
    syscalls.mount("none", str(tree / "box" / "m"), "tmpfs", 0, "size=1m")
    (tree / "box" / "m" / "data").write_text("on tmpfs")
    with pytest.raises(OSError, match="still mounted"):
        storage.remove_tree(tree / "box")
    assert (tree / "box" / "m" / "data").exists()


def test_mounting_never_follows_a_link_below_the_root(tree: Path) -> None:
    outside = tree / "outside"
    outside.mkdir()
    (tree / "root" / "containers").mkdir(parents=True)
    (tree / "root" / "containers" / "c1").symlink_to(outside)
    with pytest.raises(OSError):
        storage.mount_rootfs([Mount("tmpfs", "none", "", ())], tree / "root", "containers/c1")
    with pytest.raises(OSError):
        storage.bind_path(tree / "outside", tree / "root", "containers/c1/mounts/0", False)
    assert storage.mounts_under(tree) == []
    assert list(outside.iterdir()) == []


def test_read_only_volumes_are_read_only_all_the_way_down(tree: Path) -> None:
    source = tree / "vol"
    (source / "sub").mkdir(parents=True)
    syscalls.mount("none", str(source / "sub"), "tmpfs", 0, "size=1m")
    share = tree / "share"
    share.mkdir()
    storage.bind_path(source, share, "c1/0", readonly=True)
    with pytest.raises(OSError, match="Read-only"):
        (share / "c1/0/sub/file").write_text("x")
    storage.unmount_tree(share)
    # Unmounting our view took none of the source's own submounts with it.
    assert storage.is_mountpoint(source / "sub")
    (source / "sub" / "file").write_text("still writable on the host")
    storage.unmount_tree(source)


def test_the_share_has_a_propagation_group_of_its_own(tree: Path) -> None:
    """Nothing we mount under the share is copied onto another mount point."""
    host = tree / "host"
    host.mkdir()
    syscalls.mount(str(host), str(host), None, MS_BIND)
    syscalls.mount("none", str(host), None, 1 << 20)  # MS_SHARED: like a systemd /run
    mounts, shared = host / "sbs/mounts", host / "sbs/shared"
    mounts.parent.mkdir()
    storage.prepare_share(mounts, shared)
    storage.bind_path(tree, mounts, "containers/c1/rootfs", readonly=False)
    points = storage.mount_points()
    copies = [p for p in points if p.endswith("containers/c1/rootfs")]
    assert sorted(copies) == sorted([str(mounts / "containers/c1/rootfs"),
                                     str(shared / "containers/c1/rootfs")]), copies


def test_rootfs_mounts_stack_in_order_and_a_read_only_bind_stays_its_own(tree: Path) -> None:
    lower, upper = tree / "lower", tree / "upper"
    for d in (lower, upper):
        d.mkdir()
    (lower / "from-lower").write_text("1")
    (upper / "from-upper").write_text("2")
    root = tree / "mounts"
    root.mkdir()
    storage.mount_rootfs([Mount("bind", str(lower), "", ("rbind", "rw")),
                          Mount("bind", str(upper), "", ("rbind", "ro"))], root, "c1/rootfs")
    rootfs = root / "c1/rootfs"
    assert [p.name for p in rootfs.iterdir()] == ["from-upper"]  # the last one is on top
    with pytest.raises(OSError, match="Read-only"):
        (rootfs / "x").write_text("no")
    (root / "c1" / "beside").write_text("the parent stays writable")
    storage.unmount_tree(root / "c1")
    assert not storage.mounts_under(root)
