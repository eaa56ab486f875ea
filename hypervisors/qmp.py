"""Thin asyncio QMP client over the sans-IO core in `hypervisors.qmp_core`.

Theory of operation: `QmpClient.connect` dials QEMU's unix socket, retrying while the socket
does not exist or refuses (QEMU creates it early but accepts only once its main loop runs),
then starts one reader task and does the ``qmp_capabilities`` handshake. The reader task
feeds every chunk to the core and routes what comes out: replies resolve the future waiting
on their id, events are appended to `QmpClient.events`, end of file fails every waiter with
`QmpError`. Every call has a deadline (default from `hypervisors.timeouts.TIMEOUTS`).

A command that times out leaves its id pending in the core; a late reply is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypervisors.errors import HypervisorTimeout, QmpCommandError, QmpError
from hypervisors.qmp_core import (
    CAPABILITIES_COMMAND,
    NEED_DATA,
    Closed,
    ErrorReply,
    Event,
    Greeting,
    QmpConnection,
    Return,
)
from hypervisors.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

__all__ = ["Event", "QmpClient"]


class QmpClient:
    """One QMP connection. Create it with `QmpClient.connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Wrap an open stream; `connect` is the usual way in."""
        self._reader = reader
        self._writer = writer
        self._conn = QmpConnection()
        self._waiters: dict[str, asyncio.Future[Return | ErrorReply]] = {}
        self._greeting: asyncio.Future[Greeting] = asyncio.get_running_loop().create_future()
        self._closed = asyncio.Event()
        self._close_cause: BaseException | None = None
        #: Asynchronous events received so far, oldest first.
        self.events: list[Event] = []
        self._task = asyncio.create_task(self._read_loop(), name="qmp-reader")

    @classmethod
    async def connect(cls, path: Path, timeout: float = TIMEOUTS.qmp_connect) -> QmpClient:
        """Connect to ``path`` and finish the capabilities handshake within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await _dial(path)
                client = cls(reader, writer)
                try:
                    await client._handshake()
                except BaseException:
                    await client.close()
                    raise
                return client
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"failed to connect QMP {path}: no handshake within {timeout:g}s"
            ) from exc

    async def _handshake(self) -> None:
        await asyncio.shield(self._greeting)
        await self.execute(CAPABILITIES_COMMAND)

    @property
    def closed(self) -> bool:
        """True once the connection has ended."""
        return self._closed.is_set()

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None,
        timeout: float = TIMEOUTS.qmp_command,
    ) -> Any:
        """Run ``command`` and return its ``return`` value; `QmpCommandError` on error."""
        if self.closed:
            raise QmpError(f"failed to execute QMP command {command}: connection closed")
        cmd_id, data = self._conn.send_command(command, arguments)
        waiter: asyncio.Future[Return | ErrorReply] = asyncio.get_running_loop().create_future()
        self._waiters[cmd_id] = waiter
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(data)
                await self._writer.drain()
                reply = await waiter
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"failed to execute QMP command {command}: no reply within {timeout:g}s"
            ) from exc
        except (OSError, ConnectionError, QmpError) as exc:
            raise QmpError(f"failed to execute QMP command {command}: {exc}") from exc
        finally:
            self._waiters.pop(cmd_id, None)
        if isinstance(reply, ErrorReply):
            raise QmpCommandError(command, reply.error_class, reply.desc)
        return reply.value

    async def query_status(self, timeout: float = TIMEOUTS.qmp_command) -> str:
        """Return the VM run state, e.g. "running", "paused", "shutdown"."""
        result = await self.execute("query-status", timeout=timeout)
        return str(result["status"])

    async def quit(self, timeout: float = TIMEOUTS.qmp_command) -> None:
        """Ask QEMU to exit; the connection closing before the reply counts as success."""
        with contextlib.suppress(QmpError):
            await self.execute("quit", timeout=timeout)
            return
        if not self.closed:
            raise QmpError("failed to execute QMP command quit: connection still open")

    async def wait_closed(self, timeout: float) -> None:
        """Wait until QEMU closes the connection."""
        async with asyncio.timeout(timeout):
            await self._closed.wait()

    async def close(self) -> None:
        """Close the socket and stop the reader task (idempotent)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
        self._finish(QmpError("failed to use QMP: connection closed by us"))

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    chunk = await self._reader.read(65536)
                except (OSError, ConnectionError):
                    chunk = b""
                self._conn.receive_data(chunk)
                if self._drain_core():
                    return
        except QmpError as exc:
            log.warning("QMP connection failed: %s", exc)
            self._finish(exc)

    def _drain_core(self) -> bool:
        """Route every complete message; True once the connection has closed."""
        while (msg := self._conn.next_event()) is not NEED_DATA:
            if isinstance(msg, Greeting):
                self._greeting.set_result(msg)
            elif isinstance(msg, Event):
                self.events.append(msg)
            elif isinstance(msg, Closed):
                self._finish(QmpError("failed to read QMP: connection closed by QEMU"))
                return True
            elif isinstance(msg, Return | ErrorReply):
                waiter = self._waiters.get(msg.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        return False

    def _finish(self, cause: QmpError) -> None:
        if self._closed.is_set():
            return
        self._close_cause = cause
        self._closed.set()
        if not self._greeting.done():
            self._greeting.set_exception(cause)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(cause)
        # Nobody may be waiting on the greeting; mark its exception as retrieved.
        if self._greeting.done() and not self._greeting.cancelled():
            self._greeting.exception()


async def _dial(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a unix socket, retrying while it is missing or refusing (caller bounds it)."""
    while True:
        try:
            return await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(TIMEOUTS.poll_interval)
