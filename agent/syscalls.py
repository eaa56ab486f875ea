"""Thin ctypes wrappers for the few syscalls the agent needs and Python lacks.

Theory of operation
-------------------
The agent is PID 1 of a tiny guest with no ``mount``/``insmod`` binaries it may rely on,
and forking a busybox applet costs ~20x under TCG. So mount(2), umount2(2),
finit_module(2) and prctl(2) are called directly through libc (``ctypes.CDLL(None)``,
i.e. the already-loaded C library; no extra shared object is opened). libc is resolved
lazily on first use so that importing this module costs nothing. Every wrapper raises
``OSError`` with errno and the path involved, like the ``os`` module does.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

# mount(2) flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

# umount2(2) flags
MNT_DETACH = 2

# prctl(2) options
PR_SET_CHILD_SUBREAPER = 36

_SYS_FINIT_MODULE = 313  # x86_64; the guest is x86_64 only (see docs/environment.md)

MOUNT_FLAGS: dict[str, int] = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, path: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _enc(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); ``data`` is the filesystem's comma-separated option string."""
    result = _libc().mount(
        _enc(source), _enc(target), _enc(fstype), ctypes.c_ulong(flags), _enc(data or None)
    )
    _check(result, f"mount -t {fstype} {source}", target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_libc().umount2(_enc(target), ctypes.c_int(flags)), "umount", target)


def finit_module(path: str, params: str = "") -> bool:
    """Load the kernel module at ``path``; False if it was already loaded (EEXIST)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = _libc().syscall(
            ctypes.c_long(_SYS_FINIT_MODULE), ctypes.c_int(fd), _enc(params), ctypes.c_int(0)
        )
        if result < 0 and ctypes.get_errno() == 17:  # EEXIST: built in or loaded before
            return False
        _check(result, "finit_module", path)
        return True
    finally:
        os.close(fd)


def set_child_subreaper() -> None:
    """Make orphaned descendants reparent to us (what PID 1 gets for free)."""
    result = _libc().prctl(
        ctypes.c_int(PR_SET_CHILD_SUBREAPER), ctypes.c_ulong(1), ctypes.c_ulong(0),
        ctypes.c_ulong(0), ctypes.c_ulong(0),
    )
    _check(result, "prctl(PR_SET_CHILD_SUBREAPER)", "")


def parse_mount_options(options: list[str] | tuple[str, ...]) -> tuple[int, str]:
    """Split fstab-style options into (flags, data string for the filesystem)."""
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in MOUNT_FLAGS:
            flags |= MOUNT_FLAGS[opt]
        elif opt not in ("rw", "defaults"):
            data.append(opt)
    return flags, ",".join(data)
