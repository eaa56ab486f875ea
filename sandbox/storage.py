"""Host-side storage of a sandbox: the guest's read-only view and the container mounts.

Theory of operation (Kata's answer to CVE-2020-2026, made structural):

* ``<sandbox>/mounts`` is where the host mounts container rootfs and volume sources
  (``containers/<id>/rootfs``, ``containers/<id>/mounts/<n>``). The guest never sees it.
  It is bind-mounted onto itself and given a propagation peer group of its own.
* ``<sandbox>/shared`` is a bind of ``mounts`` (so a peer: mounts made later under
  ``mounts`` appear there), remounted read-only. That is what virtiofsd (or 9p) exports.
  The guest can write inside a container's rootfs and writable volumes, which are
  submounts with their own flags, and nowhere else: it cannot create, rename or replace
  anything at the levels the host walks, so it cannot plant a link there.
* The shim daemon runs in a mount namespace of its own that is a slave of the host's
  (`hostos.syscalls.private_mount_namespace`): the host's mounts reach us (a volume
  source mounted late is seen), ours never reach the host, and they vanish with the
  namespace when the shim and its helpers are gone.
* Every path below the sandbox directory is opened by directory fd with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` and mounted through
  ``/proc/self/fd/<fd>``; trees are removed by fd, never following a link and never
  descending into another filesystem. Unmounting reads /proc/self/mountinfo and goes
  deepest-first, so leftovers are found without any in-memory record.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.mountopts import (
    MNT_DETACH,
    MS_BIND,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REMOUNT,
    MS_SHARED,
    parse_options,
)
from hostos import syscalls
from sandbox.types import Mount

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _opened(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _walk_down(root: Path, relative: str, create: bool, mode: int = 0o755) -> int:
    """An O_PATH fd of ``root/relative``, made component by component (no link followed)."""
    fd = os.open(root, DIR_FLAGS)
    try:
        for part in (p for p in relative.split("/") if p and p != "."):
            if part == "..":
                raise OSError(errno.EINVAL, f"'..' in {relative!r}", str(root))
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, mode, dir_fd=fd)
            child = syscalls.open_beneath(fd, part, os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def isolate_mounts() -> None:
    """Put this process (the shim daemon, while it has one thread) in a mount namespace
    that receives the host's mounts and sends none back; helpers it spawns inherit it."""
    syscalls.private_mount_namespace()


def make_dirs(root: Path, relative: str, mode: int = 0o755) -> None:
    """``mkdir -p root/relative`` without following any link."""
    os.close(_walk_down(root, relative, create=True, mode=mode))


def prepare_share(mounts: Path, shared: Path) -> None:
    """Create ``mounts`` (host-only) and ``shared`` (its read-only peer for the guest)."""
    for directory in (mounts, shared):
        directory.mkdir(mode=0o700, exist_ok=True)
    if not is_mountpoint(mounts):
        syscalls.mount(str(mounts), str(mounts), None, MS_BIND)
        # Leave whatever group the parent is in, then start a group of our own.
        syscalls.mount("none", str(mounts), None, MS_PRIVATE)
        syscalls.mount("none", str(mounts), None, MS_SHARED)
    if not is_mountpoint(shared):
        syscalls.mount(str(mounts), str(shared), None, MS_BIND)
        syscalls.mount("none", str(shared), None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def mount_rootfs(mounts: Iterable[Mount], root: Path, relative: str) -> None:
    """Mount containerd's rootfs mounts onto ``root/relative`` in order; undo all on failure.

    Every target is looked up afresh from the rootfs's parent directory, so it lands on
    top of what the previous mounts put there (and never through a link)."""
    parent, _, name = relative.rpartition("/")
    with _opened(_walk_down(root, parent, create=True)) as directory:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=directory)
        done = False
        try:
            for m in mounts:
                _mount_one(m, directory, f"{name}/{m.target.lstrip('/')}".rstrip("/"))
            done = True
        finally:
            if not done:
                unmount_tree(root / relative)


def _mount_one(m: Mount, directory: int, target: str) -> None:
    flags, data = parse_options(m.options)
    try:
        where = syscalls.open_beneath(directory, target, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise OSError(e.errno, f"mount target {m.target!r} leaves or is not in the rootfs") from e
    with _opened(where):
        try:
            syscalls.mount(m.source, syscalls.fd_path(where), m.type, flags, data)
        except OSError as e:
            what = f"failed to mount {m.type} {m.source} on {target}: {e.strerror}"
            raise OSError(e.errno, what) from e
    if flags & MS_BIND and flags & MS_RDONLY:
        # A bind mount ignores MS_RDONLY until remounted; make its submounts read-only too.
        # A fresh lookup reaches the new mount (an fd from before names what is under it).
        with _opened(syscalls.open_beneath(directory, target, os.O_PATH)) as mounted:
            syscalls.set_readonly(mounted)


def bind_path(source: Path, root: Path, relative: str, readonly: bool) -> None:
    """Bind a host file or directory onto ``root/relative`` (created to match);
    ``readonly`` covers every submount of the source as well."""
    if not source.exists():
        raise OSError(errno.ENOENT, "no such file or directory", str(source))
    parent, _, name = relative.rpartition("/")
    with _opened(_walk_down(root, parent, create=True)) as directory:
        if source.is_dir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=directory)
        else:
            with contextlib.suppress(FileExistsError):
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644, dir_fd=directory))  # fmt: skip
        with _opened(syscalls.open_beneath(directory, name, os.O_PATH)) as target:
            syscalls.bind(str(source), syscalls.fd_path(target))
        if readonly:  # a fresh lookup reaches the new mount, not the directory under it
            with _opened(syscalls.open_beneath(directory, name, os.O_PATH)) as mounted:
                syscalls.set_readonly(mounted)


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
                syscalls.umount(point, syscalls.UMOUNT_NOFOLLOW)
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOENT):
                    continue  # gone already: a peer's unmount propagated here
                syscalls.umount(point, syscalls.UMOUNT_NOFOLLOW | MNT_DETACH)
    if mounts_under(path):
        raise OSError(f"failed to unmount everything under {path}: {mounts_under(path)}")


def remove_tree(path: Path) -> None:
    """Remove a directory tree by fd: no link followed, no other filesystem entered, and
    nothing at all while anything below it is still mounted."""
    if mounts_under(path):
        raise OSError(f"refusing to remove {path}: still mounted: {mounts_under(path)}")
    try:
        parent = os.open(path.parent, DIR_FLAGS)
    except FileNotFoundError:
        return
    with _opened(parent):
        try:
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        _remove_at(parent, path.name, st.st_dev, str(path))


def _remove_at(dirfd: int, name: str, device: int, shown: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dirfd)  # fmt: skip
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=dirfd)  # a file or a link: removed, never followed
        return
    with _opened(fd):
        if os.fstat(fd).st_dev != device:
            raise OSError(errno.EXDEV, f"refusing to remove {shown}: another filesystem")
        for entry in os.scandir(fd):
            if entry.is_dir(follow_symlinks=False):
                _remove_at(fd, entry.name, device, f"{shown}/{entry.name}")
            else:
                os.unlink(entry.name, dir_fd=fd)
    os.rmdir(name, dir_fd=dirfd)
