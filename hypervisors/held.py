"""A VMM under a holder (`hostos/holder.c`): owned through a socket, so it can change hands.

The VM cache spawns its VMs this way (`HeldVmm.start`): the holder is the VMM's parent and
kills it when every copy of the owner socket is closed. The cache owns it first; at the
hand-over it gives its end away (`HeldVmm.give_away`, the fd goes to the pod's shim by
SCM_RIGHTS) and the shim owns it from then on (`watch` reads the exit status there). The
VMM itself is run through a pidfd (`hostos.adopted.AdoptedProcess`) by whichever owns it.

The holder is started with `subprocess.Popen`, not asyncio's subprocess API: asyncio kills
a child whose transport is collected while it runs (at the cache's exit, say), and a
holder must outlive the cache when a pod owns it. We reap it ourselves once its pidfd
says it exited (`_reap`); if we exit first, it is reparented and reaped by init.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hostos.adopted import AdoptedProcess, wait_readable
from hostos.holder import HolderMissing, holder_argv
from hostos.procs import clean_env, start_time
from hypervisors.console import StderrLog
from hypervisors.errors import HypervisorError
from hypervisors.virtiofsd import tail

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 10.0
MAX_LINE = 4096


async def _line(sock: socket.socket, buffer: bytearray) -> dict[str, Any] | None:
    """The holder's next message (None at EOF)."""
    loop = asyncio.get_running_loop()
    while b"\n" not in buffer:
        if len(buffer) > MAX_LINE:
            raise HypervisorError("a VM holder sent a line that is too long")
        data = await loop.sock_recv(sock, MAX_LINE)
        if not data:
            return None
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    try:
        message = json.loads(line)
    except ValueError as e:
        raise HypervisorError(f"a VM holder sent {line[:80]!r}") from e
    if not isinstance(message, dict):
        raise HypervisorError(f"a VM holder sent {line[:80]!r}")
    return message


async def watch(owner: socket.socket, status: asyncio.Future[int]) -> None:
    """Read the holder's messages until it reports the VMM's exit status (into ``status``)."""
    buffer = bytearray()
    try:
        while (message := await _line(owner, buffer)) is not None:
            code = message.get("exited")
            if isinstance(code, int) and not isinstance(code, bool):
                if not status.done():
                    status.set_result(code)
                return
    except (OSError, HypervisorError) as e:
        log.warning("VM holder: %s", e)


async def _reap(holder: subprocess.Popen[bytes]) -> int:
    """Wait for the holder (not asyncio's child) to exit, and reap it."""
    pidfd = os.pidfd_open(holder.pid)
    try:
        await wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return holder.wait()


async def _stderr_reader(fd: int) -> asyncio.StreamReader:
    """An asyncio reader on the read end ``fd`` of the holder's stderr pipe (ours now)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(fd, "rb", buffering=0))
    return reader


@dataclasses.dataclass
class HeldVmm:
    """A holder process, our end of its owner socket, and the VMM it runs."""

    holder: subprocess.Popen[bytes]
    reaped: asyncio.Task[int]
    stderr: StderrLog
    owner: socket.socket | None
    process: AdoptedProcess
    reader: asyncio.Task[None] | None

    @classmethod
    async def start(cls, argv: list[str], pass_fds: tuple[int, ...], cpu_bound: bool,
                    env: Mapping[str, str] | None, stderr_log: Path) -> HeldVmm:
        """Spawn the holder and learn the VMM's pid from it; its stderr and the VMM's go
        to ``stderr_log`` (size-capped, `StderrLog`; the caller stops it). A
        `HypervisorError` quoting that log if it fails."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            holder = subprocess.Popen(
                holder_argv(theirs.fileno(), pass_fds, cpu_bound, argv),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_w,
                pass_fds=(theirs.fileno(), *pass_fds), close_fds=True, env=clean_env(env))
        except (OSError, HolderMissing) as e:
            ours.close()
            os.close(err_r)
            raise HypervisorError(f"failed to start a VM holder: {e}") from e
        finally:
            theirs.close()
            os.close(err_w)
        reaped = asyncio.ensure_future(_reap(holder))
        stderr = StderrLog(await _stderr_reader(err_r), stderr_log)
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                hello = await _line(ours, bytearray()) or {}
            pid = hello.get("pid")
            if not isinstance(pid, int):
                raise HypervisorError("its holder started no VMM")
            status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            process = AdoptedProcess.open(pid, status)
            if start_time(pid) != hello.get("start_time"):  # gone before we opened it
                process.close()
                raise HypervisorError("it exited as it started")
        except (OSError, TimeoutError, HypervisorError) as e:
            ours.close()  # the holder kills its VMM, if any, and exits
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reaped), 5)
            await stderr.finished(1.0)
            await stderr.stop()
            raise HypervisorError(f"failed to start the VMM under its holder: "
                                  f"{e or type(e).__name__}; stderr:\n{tail(stderr_log)}") from e
        return cls(holder, reaped, stderr, ours, process,
                   asyncio.ensure_future(watch(ours, status)))

    def give_away(self) -> int:
        """Our end of the owner socket, as a new fd for the next owner; ours is closed, so
        from now on the VMM lives as long as the next owner holds it."""
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None
        owner, self.owner = self.owner, None
        if owner is None:
            raise HypervisorError("the VM was given away already")
        fd = os.dup(owner.fileno())
        owner.close()
        return fd

    async def close(self) -> None:
        """Drop our ownership (the holder kills the VMM if nobody else owns it) and stop
        watching; the holder is reaped whenever it exits (`reaped`)."""
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        if self.owner is not None:
            self.owner.close()
            self.owner = None
        self.process.close()
