"""The guest console, copied from QEMU's first serial port to a size-capped log file.

The guest is untrusted and may print without end; QEMU's ``file`` chardev has no size
limit, and the state directory lives on /run, which is RAM. So QEMU connects its serial
chardev to a unix socket this class listens on, and the bytes are appended to
``console.log``; when that reaches ``max_bytes`` it is renamed to ``console.log.1``
(replacing the previous one) and a new file starts. At most ``2 * max_bytes`` stay on disk
and the most recent output (a panic, say) is always kept. Reading stops when QEMU closes
the connection; a guest that prints faster than we copy is slowed down, not buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
        try:
            await self._copy_to_file(reader)
        finally:
            writer.close()

    async def _copy_to_file(self, reader: asyncio.StreamReader) -> None:
        out = self._open()
        try:
            while data := await reader.read(READ_CHUNK):
                view = memoryview(data)
                while view:
                    room = self.max_bytes - out.tell()
                    if room <= 0:
                        out = self._rotate(out)
                        continue
                    # Small appends to a RAM-backed file: cheap enough to do on the loop.
                    out.write(view[:room])
                    view = view[room:]
                out.flush()
        except (ConnectionError, OSError) as e:
            log.debug("console copy of %s stopped: %s", self.log_path, e)
        finally:
            out.close()

    def _open(self) -> BinaryIO:
        return open(self.log_path, "ab")  # closed by _copy_to_file or _rotate

    def _rotate(self, out: BinaryIO) -> BinaryIO:
        out.close()
        os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        return self._open()

    async def stop(self) -> None:
        """Stop listening and copying (idempotent); the log files stay."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        copy = self._copy
        if copy is not None and not copy.done():
            copy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copy
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
