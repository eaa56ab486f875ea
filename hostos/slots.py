"""Host-wide slots: at most ``count`` holders at once, across processes.

Theory of operation
-------------------
A slot is one of the files ``0`` .. ``count - 1`` in a root-only directory, held by an
exclusive ``flock`` on an open descriptor of it. The kernel drops the lock when that
descriptor is closed or its process dies (``kill -9`` included), so no slot outlives its
holder and nothing needs cleaning after a crash. The descriptor is close-on-exec: a
helper the holder spawns does not keep the slot. Nothing here blocks: `try_take` either
locks a free slot at once or says none is free, and the caller decides how to wait.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def host_cpus() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) or 1


def try_take(directory: Path, count: int) -> int | None:
    """Lock a free slot of ``directory`` (made root-only if missing; a link there is
    refused); the descriptor that holds it, or None when all ``count`` are held."""
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for index in range(max(count, 1)):
            fd = os.open(str(index), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         FILE_MODE, dir_fd=dir_fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                continue
            return fd
        return None
    finally:
        os.close(dir_fd)


def give_back(fd: int) -> None:
    """Free the slot ``fd`` holds (closing it drops the lock)."""
    with contextlib.suppress(OSError):
        os.close(fd)
