"""A process that is not our child but is ours to run: a VM taken from the VM cache.

Its parent (the cache daemon) reaps it and tells us its status; we hold a pidfd, so a
signal we send reaches that process and never one that reused its pid, and the pidfd
turns readable when it exits, also if the parent died and could not say so. It answers
what the hypervisors layer asks of a spawned `asyncio.subprocess.Process`: ``pid``,
``returncode``, `wait`, plus `send_signal` (`hostos.procs.signal_child` uses it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

#: The status reported for an exit whose status nobody told us: killed.
UNKNOWN_STATUS = -signal.SIGKILL


async def wait_readable(fd: int) -> None:
    """Wait until ``fd`` is readable."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class AdoptedProcess:
    """``pid`` (opened as ``pidfd``), run by us, reaped by its parent."""

    def __init__(self, pid: int, pidfd: int, status: asyncio.Future[int]) -> None:
        """``status``: set by whoever learns the exit status (the lease to the parent)."""
        self.pid = pid
        self._pidfd = pidfd
        self._status = status
        self._waiter = asyncio.ensure_future(self._wait())

    @classmethod
    def open(cls, pid: int, status: asyncio.Future[int]) -> AdoptedProcess:
        """Open ``pid``; `ProcessLookupError` if it is gone."""
        return cls(pid, os.pidfd_open(pid), status)

    async def _wait(self) -> int:
        # One reader on the pidfd for the whole wait: a second registration of the same fd
        # would replace the first, and the first's removal would then remove it.
        exited = asyncio.ensure_future(wait_readable(self._pidfd))
        either: set[asyncio.Future[Any]] = {exited, self._status}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not self._status.done():  # it exited: give the parent a moment to say how
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._status), 1.0)
            status = self._status
            ok = status.done() and not status.cancelled() and status.exception() is None
            code = status.result() if ok else UNKNOWN_STATUS
            await exited  # told before the exit: wait for the exit itself
            return code
        finally:
            exited.cancel()

    @property
    def returncode(self) -> int | None:
        """Its exit status once it exited."""
        if self._waiter.done() and not self._waiter.cancelled():
            return self._waiter.result()
        return None

    async def wait(self) -> int:
        """Until it exits; its status."""
        return await asyncio.shield(self._waiter)

    def send_signal(self, sig: int) -> None:
        """Signal it, unless it exited."""
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def close(self) -> None:
        """Stop watching; close the pidfd (idempotent)."""
        self._waiter.cancel()
        fd, self._pidfd = self._pidfd, -1
        if fd >= 0:
            with contextlib.suppress(asyncio.InvalidStateError):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
