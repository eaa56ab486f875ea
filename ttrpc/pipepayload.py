"""Answers whose bulk waits in a pipe: moved to the connection by splice(2), never copied
through Python.

Theory of operation
-------------------
A handler whose answer is mostly bytes it would read from a pipe only to write them out
again (the guest agent's ReadStdout) returns a :class:`PipePayload`: the encoded bytes that
come before the bulk (``head``), the pipe's read end and the bulk's exact ``size``, which
the pipe already holds. The connection writes the frame header and ``head``, then moves the
bulk from the pipe to its own fd with ``os.splice``. Under TCG every byte Python copies is
emulated; this way the bulk is copied by neither the agent nor its kernel's write path, and
a virtio-serial port takes it as one buffer chain instead of one 32 KiB write at a time
(docs/performance.md "Levers"). Where the connection's fd takes no splice (EINVAL), the
bulk is read and written instead.

The frame's length goes out before the bulk, so the bulk must be there: whoever builds the
payload keeps every other reader off the pipe until :meth:`PipePayload.release`, which the
server calls once the bulk has moved, or the answer failed. The fds here are non-blocking:
waits go through the running loop, on a ``dup`` of the connection's fd (asyncio refuses a
second watcher on an fd a transport owns).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from collections.abc import Callable

#: The staging pipe's size: a whole answer (the agent reads at most 1 MiB) in one round.
STAGE_BYTES = 1 << 20


class PipePayload:
    """``head`` followed by ``size`` bytes waiting in the pipe ``fd``; ``release`` is called
    exactly once, after the bulk has moved or the answer failed."""

    __slots__ = ("_release", "fd", "head", "size")

    def __init__(self, fd: int, size: int, release: Callable[[], None], head: bytes = b"") -> None:
        if size <= 0:
            raise ValueError(f"a pipe payload carries at least one byte, not {size}")
        self.head = head
        self.fd = fd
        self.size = size
        self._release: Callable[[], None] | None = release

    def __len__(self) -> int:
        return len(self.head) + self.size

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


async def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking ``fd``, waiting while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _writable(fd)


async def move(src: int, dst: int, size: int) -> None:
    """Move exactly ``size`` bytes from the pipe ``src``, which holds them, to ``dst``.

    Through a pipe of our own, emptied into ``dst`` each time: a virtio-serial port that
    splices less than its source pipe holds overruns its descriptor table (Linux 6.1's
    ``port_fops_splice_write`` sizes the scatterlist to the whole pipe and hands the
    virtqueue a count of the entries it filled), and ``src`` may hold more than ``size``.
    Moving buffers between two pipes copies nothing."""
    stage_r, stage_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a smaller stage only means more rounds
            fcntl.fcntl(stage_w, fcntl.F_SETPIPE_SZ, STAGE_BYTES)
        left = size
        while left:
            staged = os.splice(src, stage_w, left, flags=os.SPLICE_F_NONBLOCK)
            if not staged:
                raise EOFError(f"the pipe ended {left} bytes before the {size} it held")
            await _drain(stage_r, dst, staged)
            left -= staged
    finally:
        os.close(stage_r)
        os.close(stage_w)


async def _drain(stage: int, dst: int, size: int) -> None:
    """Move all ``size`` bytes the pipe ``stage`` holds to ``dst``."""
    while size:
        try:
            moved = os.splice(stage, dst, size, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            await _writable(dst)
            continue
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            moved = 0  # this kind of fd takes no splice: read and write
            while moved < size:
                chunk = os.read(stage, size - moved)
                await write_all(dst, chunk)
                moved += len(chunk)
        size -= moved


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
