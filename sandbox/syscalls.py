"""The host syscalls the standard library lacks (mount, umount2), through cffi's ABI mode.

One module wraps them so every caller gets the same typed, errno-checked behaviour:
a failure raises OSError with the errno and the path, like the os module does.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MNT_DETACH = 0x2

_CDEF = """
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);
"""


@cache
def _lib() -> tuple[Any, Any]:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(None)


def _check(result: int, path: str) -> None:
    if result != 0:
        ffi, _ = _lib()
        errno = int(ffi.errno)
        raise OSError(errno, os.strerror(errno), path)


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2); ``data`` is the comma-separated fs-specific option string."""
    ffi, lib = _lib()
    c_data = ffi.new("char[]", data.encode()) if data else ffi.NULL
    c_type = fstype.encode() if fstype else ffi.NULL
    _check(lib.mount(source.encode(), target.encode(), c_type, flags, c_data), target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2)."""
    _, lib = _lib()
    _check(lib.umount2(target.encode(), flags), target)
