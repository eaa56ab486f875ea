"""Size-capped logs of what the guest can make a VM print: the guest console, and the
standard error of the VMM and of virtiofsd.

The guest is untrusted and may print without end (or make QEMU or virtiofsd complain
without end); QEMU's ``file`` chardev and a plain stderr file have no size limit, and the
state directory lives on /run, which is RAM. So every such stream is read by us and
appended by `copy_capped` to its log; when that reaches ``max_bytes`` it is renamed to
``<log>.1`` (replacing the previous one) and a new file starts. At most ``2 * max_bytes``
stay on disk and the most recent output (a panic, say) is always kept. A writer faster
than we copy is slowed down, not buffered.

The console arrives on a unix socket `ConsoleLog` listens on (QEMU's serial chardev
connects to it); stderr arrives on a pipe (`StderrLog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20
READ_CHUNK = 64 * 1024


class ConsoleLog:
    """Listen on ``socket_path`` for QEMU's serial chardev; copy into ``log_path``."""

    def __init__(self, socket_path: Path, log_path: Path,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.max_bytes = max_bytes
        self._server: asyncio.Server | None = None
        self._copy: asyncio.Task[None] | None = None
        self._connection: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        """Listen (root-only socket) before QEMU is spawned: QEMU connects at start-up."""
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._server = await asyncio.start_unix_server(self._on_connect, str(self.socket_path))
        os.chmod(self.socket_path, 0o600)

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self._copy is not None:  # one console per VM; refuse anything else
            writer.close()
            return
        self._copy = asyncio.current_task()
        self._connection = writer
        try:
            await self._copy_to_file(reader)
        finally:
            writer.close()

    async def _copy_to_file(self, reader: asyncio.StreamReader) -> None:
        await copy_capped(reader, self.log_path, self.max_bytes)

    async def adopt(self, fd: int) -> None:
        """Copy from a console connection another process accepted (``fd``, now ours)
        instead of listening: a VM taken from the VM cache."""
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self._connection = writer
        self._copy = asyncio.ensure_future(self._copy_to_file(reader))

    async def detach(self) -> int | None:
        """Stop listening and copying, and give the connection away: a new fd of it (the
        caller's), None if the VMM never connected."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        connection, self._connection = self._connection, None
        if connection is None or connection.is_closing():
            return None
        fd = os.dup(connection.get_extra_info("socket").fileno())
        copy = self._copy  # kept: no second connection is copied
        if copy is not None and not copy.done():
            copy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copy
        return fd

    async def stop(self) -> None:
        """Stop listening and copying (idempotent); the log files stay."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        copy, connection, self._connection = self._copy, self._connection, None
        if connection is not None:
            connection.close()
        if copy is not None and not copy.done():
            copy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copy
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


async def copy_capped(reader: asyncio.StreamReader, log_path: Path,
                      max_bytes: int = DEFAULT_MAX_BYTES) -> None:  # fmt: skip
    """Append what ``reader`` gives to ``log_path`` until EOF, rotating at ``max_bytes``."""
    out: BinaryIO = open(log_path, "ab")  # noqa: SIM115  (rotated below)
    try:
        while data := await reader.read(READ_CHUNK):
            view = memoryview(data)
            while view:
                room = max_bytes - out.tell()
                if room <= 0:
                    out.close()
                    os.replace(log_path, log_path.with_name(log_path.name + ".1"))
                    out = open(log_path, "ab")  # noqa: SIM115
                    continue
                # Small appends to a RAM-backed file: cheap enough to do on the loop.
                out.write(view[:room])
                view = view[room:]
            out.flush()
    except (ConnectionError, OSError) as e:
        log.debug("copy into %s stopped: %s", log_path, e)
    finally:
        out.close()


class StderrLog:
    """A child's stderr pipe copied into a capped log until the child closes it."""

    def __init__(self, reader: asyncio.StreamReader | None, log_path: Path,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:  # fmt: skip
        self.log_path = log_path
        self._copy = (asyncio.ensure_future(copy_capped(reader, log_path, max_bytes))
                      if reader is not None else None)  # fmt: skip

    async def finished(self, timeout: float) -> None:
        """Wait (bounded) until everything the child wrote is in the log."""
        if self._copy is not None:
            await asyncio.wait([self._copy], timeout=timeout)

    async def stop(self) -> None:
        """Stop copying (idempotent); the log stays."""
        if self._copy is not None and not self._copy.done():
            self._copy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._copy
