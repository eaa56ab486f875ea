"""Host-side storage of a sandbox: the shared directory and the container rootfs mounts.

Theory of operation: ``<sandbox>/shared`` is bind-mounted onto itself with shared
propagation before virtiofsd starts. virtiofsd later makes its own mount namespace a slave
of it, so a rootfs mounted under ``shared/containers/<id>/rootfs`` after the VM booted still
appears in the guest. Unmounting reads /proc/self/mountinfo and goes deepest-first, so a
crashed shim's leftovers can be found without any in-memory record.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from common.mountopts import MNT_DETACH, MS_BIND, MS_RDONLY, MS_REMOUNT, MS_SHARED, parse_options
from hostos import syscalls
from sandbox.types import Mount


def prepare_shared_dir(shared: Path) -> None:
    """Create ``shared`` as a shared-propagation bind mount of itself (idempotent)."""
    shared.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not is_mountpoint(shared):
        syscalls.mount(str(shared), str(shared), None, MS_BIND)
    syscalls.mount("none", str(shared), None, MS_SHARED)


def mount_rootfs(mounts: Iterable[Mount], target: Path) -> None:
    """Mount containerd's rootfs mounts onto ``target`` in order; undo all on failure."""
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    done = False
    try:
        for m in mounts:
            _mount_one(m, target)
        done = True
    finally:
        if not done:
            unmount_tree(target)


def _mount_one(m: Mount, target: Path) -> None:
    flags, data = parse_options(m.options)
    where = str(_inside(target, m.target))
    try:
        syscalls.mount(m.source, where, m.type, flags, data)
        if flags & MS_BIND and flags & MS_RDONLY:
            # A bind mount ignores MS_RDONLY until remounted.
            syscalls.mount("none", where, None, flags | MS_REMOUNT)
    except OSError as e:
        what = f"failed to mount {m.type} {m.source} on {where}: {e.strerror}"
        raise OSError(e.errno, what) from e


def _inside(root: Path, relative: str) -> Path:
    """``root/relative``, refusing anything that would land outside ``root``."""
    base = root.resolve()
    where = (base / relative.lstrip("/")).resolve() if relative else base
    if where != base and base not in where.parents:
        raise OSError(errno.EINVAL, f"mount target {relative!r} leaves {root}")
    return where


def bind_dir(source: Path, target: Path, readonly: bool = False) -> None:
    """Bind-mount a host directory (a rootfs prepared without mounts) onto ``target``."""
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    _bind(source, target, readonly)


def bind_path(source: Path, target: Path, readonly: bool) -> None:
    """Bind-mount a host file or directory onto ``target`` (created to match)."""
    if not source.exists():
        raise OSError(errno.ENOENT, "no such file or directory", str(source))
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if source.is_dir():
        target.mkdir(mode=0o755, exist_ok=True)
    else:
        target.touch(mode=0o644, exist_ok=True)
    _bind(source, target, readonly)


def _bind(source: Path, target: Path, readonly: bool) -> None:
    syscalls.bind(str(source), str(target), readonly)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split(" ", 5)[4]) for line in f if line.strip()]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    root = str(path).rstrip("/")
    found = [p for p in mount_points() if p == root or p.startswith(root + "/")]
    return sorted(set(found), key=lambda p: (p.count("/"), p), reverse=True)


def is_mountpoint(path: Path) -> bool:
    """Whether ``path`` itself is a mount point."""
    return str(path).rstrip("/") in mount_points()


def unmount_tree(path: Path) -> None:
    """Unmount everything at or below ``path`` (stacked mounts included); idempotent."""
    for _ in range(16):  # stacked mounts on one point need one pass each
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            try:
                syscalls.umount(point)
            except OSError:
                syscalls.umount(point, MNT_DETACH)
    if mounts_under(path):
        raise OSError(f"failed to unmount everything under {path}: {mounts_under(path)}")


def remove_tree(path: Path) -> None:
    """Remove a directory tree, but never through a mount point (which would delete data)."""
    if not path.exists():
        return
    if mounts_under(path):
        raise OSError(f"refusing to remove {path}: still mounted: {mounts_under(path)}")
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)
