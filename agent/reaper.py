"""The one child reaper of the agent process, and the only way the agent spawns children.

Theory of operation
-------------------
As PID 1 (guest) or a child subreaper (host tests), every orphan in the process tree is
reparented to us: container init processes once ``crun create`` exits, detached exec
processes, crun's own intermediates. Exactly one piece of code may call ``waitpid``,
otherwise two waiters race and one loses an exit status. That is :class:`Reaper`:

* SIGCHLD is handled on the event loop (``loop.add_signal_handler``); the handler drains
  ``waitpid(-1, WNOHANG)`` because signals coalesce (one SIGCHLD may stand for many exits).
* Each exit is dispatched to the future registered for that pid. An exit that arrives
  before anyone registered its pid (a container init can die before we have read its pid
  file) is kept in a bounded table and handed out on registration.
* Status follows the shell convention: the exit code, or 128 + the signal number.

Children are spawned with ``os.posix_spawn`` (vfork-like, cheap under TCG) and never with
``subprocess``, whose own ``waitpid(pid)`` would race the reaper.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence

# Exits nobody claimed (crun intermediates, stray orphans) are kept this many at most, and
# only this long: an early exit is claimed within one crun call, while an old entry could
# belong to a pid number the kernel has since reused for a new process.
_MAX_UNCLAIMED = 1024
_UNCLAIMED_TTL = 60.0


def exit_status(status: int) -> int:
    """waitpid status -> shell-style status (code, or 128 + signal)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255  # stopped/continued are not reported (no WUNTRACED); defensive only


class Reaper:
    """Collects every child exit and dispatches it to whoever awaits that pid."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, tuple[int, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle SIGCHLD on ``loop``; reap anything that exited before we were installed."""
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None

    def reap(self) -> None:
        """Drain every exited child (non-blocking)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.dispatch(pid, exit_status(status))

    def dispatch(self, pid: int, status: int) -> None:
        """Deliver ``status`` to the waiter of ``pid``, or keep it until one registers."""
        fut = self._waiters.pop(pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(status)
            return
        if len(self._unclaimed) >= _MAX_UNCLAIMED:
            del self._unclaimed[next(iter(self._unclaimed))]  # oldest first
        self._unclaimed[pid] = (status, time.monotonic())

    def register(self, pid: int) -> asyncio.Future[int]:
        """A future for the exit status of ``pid`` (already resolved if it exited early)."""
        existing = self._waiters.get(pid)
        if existing is not None:
            return existing
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        status, when = self._unclaimed.pop(pid, (0, -_UNCLAIMED_TTL))
        if time.monotonic() - when < _UNCLAIMED_TTL:
            fut.set_result(status)
        else:
            self._waiters[pid] = fut
        return fut

    def spawn(
        self,
        argv: Sequence[str],
        stdin: int,
        stdout: int,
        stderr: int,
        env: dict[str, str] | None = None,
    ) -> tuple[int, asyncio.Future[int]]:
        """Start ``argv`` with the given fds as its stdio; returns (pid, exit future).

        Registration happens before control returns to the loop, so the exit cannot be
        reaped unclaimed.
        """
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        pid = os.posix_spawn(
            argv[0], list(argv), env if env is not None else dict(os.environ),
            file_actions=actions,
            # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive exec, and a
            # container process must start with the defaults.
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
        return pid, self.register(pid)

    def spawn_on_tty(
        self, argv: Sequence[str], tty: str, env: dict[str, str]
    ) -> tuple[int, asyncio.Future[int]]:
        """Start ``argv`` as the leader of a new session whose stdin, stdout, stderr and
        controlling terminal are the terminal ``tty`` (a pty slave's path): the child opens
        it after ``setsid`` and without O_NOCTTY, which is what makes it the controlling
        terminal. Returns (pid, exit future), as `spawn`."""
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, tty, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        pid = os.posix_spawn(argv[0], list(argv), env, file_actions=actions, setsid=True,
                             setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        return pid, self.register(pid)
