"""One ttrpc connection's byte stream, as frames: the asyncio shell around :mod:`ttrpc.frames`.

Theory of operation
-------------------
:class:`FrameChannel` wraps an ``asyncio.StreamReader``/``StreamWriter`` pair and uses only
``reader.read``, ``writer.write``, ``writer.drain`` and ``writer.close``, so it works over unix
sockets, vsock, pipes and character devices (the guest agent serves on a virtio-serial port).
The one exception, :meth:`FrameChannel.send_pipe_payload`, waits until the transport holds
nothing, then writes a frame itself to the transport's fd, its bulk spliced from a pipe
(:mod:`ttrpc.pipepayload`); a transport without an fd gets the bulk read and written.

- Receiving has one consumer (the connection's read loop): :meth:`FrameChannel.receive` returns
  the next batch of frame events, an empty list at end of stream, and raises
  :class:`~ttrpc.frames.ProtocolError` on garbage.
- Sending is shared by many tasks: :meth:`FrameChannel.send` encodes the frame first (so an
  oversized payload raises :class:`~ttrpc.frames.FrameTooLargeError` before anything is
  written) and writes it whole under the per-connection write lock, so frames never interleave.
- :meth:`FrameChannel.close` flushes for at most :data:`CLOSE_TIMEOUT` seconds and then aborts:
  a device nobody reads (a dead VM) must not hang the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from ttrpc import pipepayload
from ttrpc.frames import (
    HEADER,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameEvent,
    FrameTooLargeError,
    MessageType,
    encode_frame,
)
from ttrpc.pipepayload import PipePayload

READ_CHUNK = 256 * 1024
CLOSE_TIMEOUT = 1.0


class FrameChannel:
    """Frames over one reader/writer pair (see the module docstring)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_payload = max_payload
        self._decoder = FrameDecoder(max_payload)
        self._write_lock = asyncio.Lock()  # guards whole-frame writes and drains

    async def receive(self) -> list[FrameEvent]:
        """The next complete frame events; an empty list means the peer closed the stream."""
        while True:
            events = list(self._decoder.events())
            if events:
                return events
            data = await self._reader.read(READ_CHUNK)
            if not data:
                return []
            self._decoder.feed(data)

    async def send(self, stream_id: int, msg_type: MessageType, payload: bytes) -> None:
        """Write one whole frame; raises FrameTooLargeError, or OSError if the peer is gone."""
        frame = encode_frame(stream_id, msg_type, payload, max_payload=self._max_payload)
        async with self._write_lock:
            if self._writer.is_closing():
                raise ConnectionResetError("ttrpc connection is closed")
            self._writer.write(frame)
            await self._writer.drain()

    async def send_pipe_payload(self, stream_id: int, msg_type: MessageType, prefix: bytes,
                                payload: PipePayload) -> None:
        """Write one whole frame of ``prefix`` and ``payload``, its bulk spliced from its pipe
        (:mod:`ttrpc.pipepayload`); raises like :meth:`send`. A failure once the frame has
        begun leaves the stream out of step: the connection is aborted."""
        length = len(prefix) + len(payload)
        if length > self._max_payload:
            raise FrameTooLargeError(
                f"ttrpc payload of {length} bytes exceeds the {self._max_payload}-byte limit"
            )
        header = HEADER.pack(length, stream_id, msg_type, 0) + prefix + payload.head
        async with self._write_lock:
            if self._writer.is_closing():
                raise ConnectionResetError("ttrpc connection is closed")
            fd = self._fileno()
            if fd is None:  # not an fd we can write to ourselves: copy the bulk
                bulk = await _read_exactly(payload)
                self._writer.write(header + bulk)
                await self._writer.drain()
                return
            await self._flush()
            out = os.dup(fd)
            try:
                await pipepayload.write_all(out, header)
                await pipepayload.move(payload.fd, out, payload.size)
            except BaseException:
                self.abort()
                raise
            finally:
                os.close(out)

    def _fileno(self) -> int | None:
        """The fd our writer's transport writes to, if it has one."""
        for key in ("pipe", "socket"):
            end = self._writer.get_extra_info(key)
            if end is not None:
                return int(end.fileno())
        return None

    async def _flush(self) -> None:
        """Wait until the transport has written everything it holds (drain alone waits only
        until it holds less than its low-water mark)."""
        transport = self._writer.transport
        if not transport.get_write_buffer_size():
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self._writer.drain()
        finally:
            transport.set_write_buffer_limits(high=high, low=low)

    async def close(self) -> None:
        """Close the writer: flush briefly, then abort the transport."""
        if not self._writer.is_closing():
            self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except (OSError, TimeoutError):
            self._writer.transport.abort()

    def abort(self) -> None:
        """Drop the connection at once (no flush); safe to call more than once."""
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.transport.abort()


async def pipe_streams(
    read_fd: int, write_fd: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A reader/writer pair over two file descriptors: pipes or a character device.

    Takes ownership of both fds (they are closed with the streams). For one character device
    opened O_RDWR (a virtio-serial port), pass ``fd`` and ``os.dup(fd)``.
    """
    loop = asyncio.get_running_loop()
    # The transports own the file objects and close them (hence no context managers).
    read_file = open(read_fd, "rb", buffering=0)  # noqa: SIM115
    write_file = open(write_fd, "wb", buffering=0)  # noqa: SIM115
    reader = asyncio.StreamReader()
    read_protocol = asyncio.StreamReaderProtocol(reader)
    await loop.connect_read_pipe(lambda: read_protocol, read_file)
    write_transport, write_protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), write_file
    )
    return reader, asyncio.StreamWriter(write_transport, write_protocol, reader, loop)


async def _read_exactly(payload: PipePayload) -> bytes:
    """The payload's head and bulk, read from its pipe (which holds the bulk)."""
    chunks = [payload.head]
    left = payload.size
    while left:
        chunk = os.read(payload.fd, left)
        if not chunk:
            raise EOFError(f"the pipe ended {left} bytes before the {payload.size} it held")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
