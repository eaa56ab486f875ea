"""Process stdio ends owned by the agent: pipes and pty masters, read and written on demand.

Theory of operation
-------------------
Each process has up to three ends on our side: stdin (we write), stdout and stderr (we
read). They are plain non-blocking fds driven by ``loop.add_reader``/``add_writer``; no
pump task copies data in the background. A ReadStdout request is answered as soon as the
fd is readable, so output produced before the host asks simply waits in the kernel's pipe
buffer (and the writer blocks when it is full: back-pressure, nothing lost). From a pty it
is one ``os.read``; from a pipe (:meth:`StreamReader.take`) the answer is a
:class:`~ttrpc.pipepayload.PipePayload` of the bytes the pipe holds, which the connection
splices out of it without their passing through Python (each byte Python copies is
emulated under TCG).
Under TCG (the host sets ``agent.gather_output``), a process output reader that finds
output in full flow (at least GATHER_FROM bytes at once) waits GATHER_FOR before it answers
and adds what came meanwhile: each answer costs the guest ~1 ms of Python there, and a
producer that writes 4-8 KiB at a time would otherwise be answered in pieces that size
(docs/performance.md "Levers"). A trickle (less than that) is answered at once.

End of stream is ``b""``: a pipe read returning 0 bytes, or EIO on a pty master (the slave
side hung up). Once EOF was seen the fd is closed and every later read returns ``b""``.
Closing an end wakes a reader or writer parked on it, so RemoveContainer never hangs.
A terminal process has one pty master; the reader and the writer each own a ``dup`` of it
so that they can be closed independently.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import stat
import struct

from agent.errors import FailedPrecondition
from ttrpc.pipepayload import PipePayload


class _FdEnd:
    """A non-blocking fd with an awaitable readiness wait that ``close`` interrupts."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        self._lock = asyncio.Lock()
        self._ready: asyncio.Future[None] | None = None

    async def _wait(self, fd: int, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        self._ready = fut = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, wake)
        try:
            await fut
        finally:
            # After close_now the number may already belong to another fd: leave it alone.
            if self.fd == fd:
                (loop.remove_writer if writable else loop.remove_reader)(fd)
            self._ready = None

    def close_now(self) -> None:
        """Close the fd, waking anyone parked on it (they then see it closed)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if self._ready is not None:  # parked, or woken but not yet back: still registered
            if not self._ready.done():
                self._ready.set_result(None)
            # Unregister now: the parked task, once back, sees the fd closed and leaves the
            # number alone, and a stale registration would break the next fd given it.
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        os.close(fd)

    @property
    def closed(self) -> bool:
        return self.fd is None


#: At least this many bytes waiting in a pipe means output in full flow: gather more.
GATHER_FROM = 4096
#: How long a reader that gathers waits for more before it answers (under TCG a producer
#: makes several hundred KiB meanwhile; the pipe holds 1 MiB, so it keeps writing). 40 ms:
#: 16 MiB through a pipe 9 % sooner than with 20 ms (docs/performance.md "Levers").
GATHER_FOR = 0.04


class StreamReader(_FdEnd):
    """Our read end of a process's stdout/stderr (a pipe or a pty master), or of a socket.
    ``gather``: answer a pipe's output in full flow in larger pieces (module docstring)."""

    def __init__(self, fd: int | None, gather: bool = False) -> None:
        super().__init__(fd)
        self.gather = gather
        self.is_pipe = fd is not None and stat.S_ISFIFO(os.fstat(fd).st_mode)

    async def take(self, n: int) -> bytes | PipePayload:
        """What :meth:`read` would answer; from a pipe, a PipePayload instead of the bytes:
        they stay in the pipe for the connection to splice (ttrpc.pipepayload), and this
        reader stays locked until the payload is released, so nobody else reads them."""
        if not self.is_pipe:
            return await self.read(n)
        await self._lock.acquire()
        try:
            queued = await self._wait_queued(n)
        except BaseException:
            self._lock.release()
            raise
        if isinstance(queued, bytes):  # end of stream, or bytes already read
            self._lock.release()
            return queued
        assert self.fd is not None  # it held bytes a moment ago
        held = os.dup(self.fd)  # a close_now from here on leaves the bytes ours to move

        def release() -> None:
            os.close(held)
            self._lock.release()

        payload = PipePayload(held, queued, release)
        if self.gather and GATHER_FROM <= queued < n:
            try:
                await asyncio.sleep(GATHER_FOR)
            except BaseException:
                payload.release()
                raise
            payload.size = min(_queued_bytes(held), n)
        return payload

    async def _wait_queued(self, n: int) -> int | bytes:
        """How many bytes (up to ``n``) the pipe holds, once it holds any; at end of stream
        ``b""``, and if bytes came between two checks, those bytes."""
        while self.fd is not None:
            queued = _queued_bytes(self.fd)
            if queued:
                return min(queued, n)
            try:
                data = os.read(self.fd, n)  # empty: end of stream, or nothing yet
            except BlockingIOError:
                await self._wait(self.fd, writable=False)
                continue
            if not data:
                self.close_now()
            return data
        return b""

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes as soon as any are available; ``b""`` at end of stream."""
        async with self._lock:
            return await self._read_once(n)

    async def _read_once(self, n: int) -> bytes:
        """Up to ``n`` bytes as soon as any are available; ``b""`` at end of stream."""
        while self.fd is not None:
            try:
                data = os.read(self.fd, n)
            except BlockingIOError:
                await self._wait(self.fd, writable=False)
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:  # EIO: pty slave closed, i.e. EOF
                    raise
                data = b""
            if not data:
                self.close_now()
            return data
        return b""


#: ``termios.FIONREAD`` (asm-generic/ioctls.h, x86 and arm64 alike), without loading the
#: termios extension at every boot for it: only terminal processes need that.
FIONREAD = 0x541B


def _queued_bytes(fd: int) -> int:
    """Bytes waiting in the pipe ``fd``."""
    return int(struct.unpack("i", fcntl.ioctl(fd, FIONREAD, b"\0\0\0\0"))[0])


class StreamWriter(_FdEnd):
    """Our write end of a process's stdin (a pipe or a pty master)."""

    def __init__(self, fd: int | None, eof_byte: bytes = b"") -> None:
        super().__init__(fd)
        # A pty has no "close the write end" EOF: send the terminal's EOF char (^D) instead.
        self._eof_byte = eof_byte

    async def write(self, data: bytes) -> int:
        """Write all of ``data`` (waiting while the pipe is full); returns its length."""
        async with self._lock:
            view = memoryview(data)
            while view:
                if self.fd is None:
                    raise FailedPrecondition("stdin is closed")
                try:
                    view = view[os.write(self.fd, view) :]
                except BlockingIOError:
                    await self._wait(self.fd, writable=True)
                except BrokenPipeError as exc:
                    raise FailedPrecondition("the process closed its stdin") from exc
            return len(data)

    async def close(self) -> None:
        """Close after pending writes went out (they hold the lock)."""
        async with self._lock:
            if self.fd is not None and self._eof_byte:
                with contextlib.suppress(OSError):  # a gone terminal needs no EOF
                    os.write(self.fd, self._eof_byte)
            self.close_now()
