"""Thin asyncio QMP client over the sans-IO core in `hypervisors.qmp_core`.

Theory of operation: `QmpClient.connect` dials the VMM's unix socket, retrying while the
socket does not exist or refuses (QEMU creates it early but accepts only once its main loop
runs), then starts one reader task and does the ``qmp_capabilities`` handshake. The client
owns the raw non-blocking socket (not an asyncio stream) so that a command can carry file
descriptors: `execute(..., fds=[...])` sends the command bytes and the fds in one
``sendmsg`` with ``SCM_RIGHTS``, which is how QEMU's ``getfd``/``add-fd`` receive them. Writes
are serialised by one lock, so command bytes never interleave.

The reader task feeds every chunk to the core and routes what comes out: replies resolve the
future waiting on their id; events go to `QmpClient.events`, a bounded `EventLog` callers can
wait on (the oldest events are dropped past its capacity, and counted); end of file fails
every waiter with `QmpError`. A `QmpDialect` says how a VMM's QMP differs from QEMU's
(StratoVirt: replies without ids, one command at a time). Every call has a deadline (default from
`hypervisors.timeouts.TIMEOUTS`). A command that times out leaves its id pending in the core;
a late reply is dropped.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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

__all__ = ["QEMU_DIALECT", "Event", "EventLog", "QmpClient", "QmpDialect"]

READ_SIZE = 65536
EVENT_CAPACITY = 256


@dataclass(frozen=True)
class QmpDialect:
    """How a VMM's QMP server differs from QEMU's (the default is QEMU's)."""

    #: Some replies carry no id: they answer the oldest pending command.
    untagged_replies: bool = False
    #: The server parses each read as one message: never have two commands in flight.
    one_command_at_a_time: bool = False


#: QEMU's QMP: replies carry their command's id; commands may overlap.
QEMU_DIALECT = QmpDialect()


class EventLog:
    """The most recent QMP events (bounded), numbered, and waiters for the next ones."""

    def __init__(self, capacity: int = EVENT_CAPACITY) -> None:
        self._ring: collections.deque[tuple[int, Event]] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._waiters: list[tuple[Callable[[Event], bool], asyncio.Future[Event]]] = []
        #: Events that fell out of the ring before anyone read them.
        self.dropped = 0

    def mark(self) -> int:
        """The sequence number of the latest event; pass it to `wait_for` as ``after``."""
        return self._seq

    def recent(self) -> list[Event]:
        """What the ring holds, oldest first."""
        return [event for _, event in self._ring]

    def append(self, event: Event) -> None:
        """Record an event and wake the waiters it satisfies."""
        if len(self._ring) == self._ring.maxlen:
            self.dropped += 1
        self._seq += 1
        self._ring.append((self._seq, event))
        for match, future in list(self._waiters):
            if not future.done() and match(event):
                future.set_result(event)

    def fail(self, cause: BaseException) -> None:
        """The connection ended: every waiter gets ``cause``."""
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(cause)

    async def wait_for(
        self, names: Iterable[str], timeout: float, after: int | None = None
    ) -> Event:
        """The first event named in ``names`` numbered above ``after`` (default: from now)."""
        wanted = frozenset(names)
        start = self._seq if after is None else after
        for seq, event in self._ring:
            if seq > start and event.name in wanted:
                return event
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        entry = (lambda e: e.name in wanted, future)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"failed to wait for QMP event {'/'.join(sorted(wanted))}: none in {timeout:g}s"
            ) from exc
        finally:
            self._waiters.remove(entry)


class QmpClient:
    """One QMP connection. Create it with `QmpClient.connect`."""

    def __init__(self, sock: socket.socket, dialect: QmpDialect = QEMU_DIALECT) -> None:
        """Wrap a connected socket; `connect` is the usual way in."""
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._conn = QmpConnection(untagged_replies=dialect.untagged_replies)
        self._write_lock = asyncio.Lock()
        #: Held from send to reply when the dialect wants one command at a time.
        self._one_at_a_time = asyncio.Lock() if dialect.one_command_at_a_time else None
        self._waiters: dict[str, asyncio.Future[Return | ErrorReply]] = {}
        self._greeting: asyncio.Future[Greeting] = self._loop.create_future()
        self._closed = asyncio.Event()
        #: Asynchronous events (bounded).
        self.events = EventLog()
        self._task = asyncio.create_task(self._read_loop(), name="qmp-reader")

    @classmethod
    async def connect(cls, path: Path, timeout: float = TIMEOUTS.qmp_connect,
                      dialect: QmpDialect = QEMU_DIALECT) -> QmpClient:  # fmt: skip
        """Connect to ``path`` and finish the capabilities handshake within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                client = cls(await _dial(path), dialect)
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
        timeout: float = TIMEOUTS.qmp_command, fds: Sequence[int] = (),
    ) -> Any:
        """Run ``command`` (sending ``fds`` with it) and return its ``return`` value."""
        if self.closed:
            raise QmpError(f"failed to execute QMP command {command}: connection closed")
        if self._one_at_a_time is None:
            return await self._execute(command, arguments, timeout, fds)
        try:
            async with asyncio.timeout(timeout):
                await self._one_at_a_time.acquire()
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"failed to execute QMP command {command}: another command still running "
                f"after {timeout:g}s") from exc
        try:
            return await self._execute(command, arguments, timeout, fds)
        finally:
            self._one_at_a_time.release()

    async def _execute(self, command: str, arguments: Mapping[str, Any] | None,
                       timeout: float, fds: Sequence[int]) -> Any:  # fmt: skip
        cmd_id, data = self._conn.send_command(command, arguments)
        waiter: asyncio.Future[Return | ErrorReply] = self._loop.create_future()
        self._waiters[cmd_id] = waiter
        try:
            async with asyncio.timeout(timeout):
                await self._send(data, fds)
                reply = await waiter
        except TimeoutError as exc:
            raise HypervisorTimeout(
                f"failed to execute QMP command {command}: no reply within {timeout:g}s"
            ) from exc
        except (OSError, QmpError) as exc:
            raise QmpError(f"failed to execute QMP command {command}: {exc}") from exc
        finally:
            self._waiters.pop(cmd_id, None)
        if isinstance(reply, ErrorReply):
            raise QmpCommandError(command, reply.error_class, reply.desc)
        return reply.value

    async def get_fd(self, name: str, fd: int, timeout: float = TIMEOUTS.qmp_command) -> None:
        """Hand ``fd`` to the VMM under ``name`` (``getfd``); our copy stays ours to close."""
        await self.execute("getfd", {"fdname": name}, timeout=timeout, fds=[fd])

    async def query_status(self, timeout: float = TIMEOUTS.qmp_command) -> str:
        """Return the VM run state, e.g. "running", "paused", "shutdown"."""
        result = await self.execute("query-status", timeout=timeout)
        return str(result["status"])

    async def quit(self, timeout: float = TIMEOUTS.qmp_command) -> None:
        """Ask the VMM to exit; the connection closing before the reply counts as success."""
        with contextlib.suppress(QmpError):
            await self.execute("quit", timeout=timeout)
            return
        if not self.closed:
            raise QmpError("failed to execute QMP command quit: connection still open")

    async def wait_closed(self, timeout: float) -> None:
        """Wait until the VMM closes the connection."""
        async with asyncio.timeout(timeout):
            await self._closed.wait()

    async def close(self) -> None:
        """Close the socket and stop the reader task (idempotent)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sock.close()
        self._finish(QmpError("failed to use QMP: connection closed by us"))

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        async with self._write_lock:
            view = memoryview(data)
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                while True:
                    try:
                        sent = self._sock.sendmsg([view], ancillary)
                        break
                    except BlockingIOError:
                        await self._writable()
                view = view[sent:]
            if view:
                await self._loop.sock_sendall(self._sock, view)

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        fd = self._sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(fd)

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    chunk = await self._loop.sock_recv(self._sock, READ_SIZE)
                except OSError:
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
                self._finish(QmpError("failed to read QMP: connection closed by the VMM"))
                return True
            elif isinstance(msg, Return | ErrorReply):
                waiter = self._waiters.get(msg.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        return False

    def _finish(self, cause: QmpError) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if not self._greeting.done():
            self._greeting.set_exception(cause)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(cause)
        self.events.fail(cause)
        # Nobody may be waiting on the greeting; mark its exception as retrieved.
        if self._greeting.done() and not self._greeting.cancelled():
            self._greeting.exception()


async def _dial(path: Path) -> socket.socket:
    """Connect to a unix socket, retrying while it is missing or refusing (caller bounds it)."""
    loop = asyncio.get_running_loop()
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            await asyncio.sleep(TIMEOUTS.poll_interval)
        except BaseException:
            sock.close()
            raise
