"""posix_spawn with chosen fds and stdio on /dev/null, for ``start`` (its daemon) and the
daemon (binary loggers). Its own module because ``start`` must not import asyncio, which
`shim.stdio` needs: ~20 ms of every container's start on the host."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping


def spawn_with_fds(argv: list[str], env: Mapping[str, str], fds: Mapping[int, int],
                   setsid: bool) -> int:
    """posix_spawn ``argv`` with stdio on /dev/null and ``fds`` (child fd -> our fd) mapped;
    its pid.

    The sources are first duplicated above 10 so that mapping one never clobbers another.
    """
    high = {target: fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, 10) for target, src in fds.items()}
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    actions += [(os.POSIX_SPAWN_DUP2, src, target) for target, src in high.items()]
    try:
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=setsid)
    finally:
        for src in high.values():
            os.close(src)
