"""One ttrpc connection's byte stream, as frames: the asyncio shell around :mod:`ttrpc.frames`.

Theory of operation
-------------------
:class:`FrameChannel` wraps an ``asyncio.StreamReader``/``StreamWriter`` pair and uses only
``reader.read``, ``writer.write``, ``writer.drain`` and ``writer.close``, so it works over unix
sockets, vsock, pipes and character devices (the guest agent serves on a virtio-serial port).

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

from ttrpc.frames import MAX_PAYLOAD, FrameDecoder, FrameEvent, MessageType, encode_frame

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
