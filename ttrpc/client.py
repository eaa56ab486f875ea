"""asyncio ttrpc client: concurrent unary calls multiplexed over one connection.

Theory of operation
-------------------
Each :meth:`Client.call` takes the next odd stream id (1, 3, 5, ...), registers a future for
it in ``_pending``, writes one Request frame (whole, under the connection's write lock) and
awaits the future. One background task, the read loop, resolves futures as Response frames
arrive, in whatever order the server completes them.

- A response for a stream id with no pending call (unknown, timed out or cancelled) is dropped.
- ``timeout`` bounds the whole call: it is sent as ``timeout_nano`` and, when it expires, the
  call is abandoned with ``TtrpcError(DEADLINE_EXCEEDED)``. ``None`` means no deadline
  (long polls such as ``Wait``).
- When the connection ends (EOF, I/O error, garbage from the peer, or :meth:`Client.close`),
  ``closed`` is set and every pending and later call fails with ``TtrpcError(UNAVAILABLE)``.
- An outgoing request over 4 MiB fails with ``RESOURCE_EXHAUSTED`` without being sent; so does
  a call whose response the server reports, or we receive, as too large.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from protocols import ttrpc_pb2
from ttrpc.channel import FrameChannel
from ttrpc.errors import Code, TtrpcError
from ttrpc.frames import (
    MAX_STREAM_ID,
    FrameEvent,
    FrameTooLargeError,
    MessageType,
    OversizedFrame,
    ProtocolError,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class Client:
    """A ttrpc client on one connection; create it inside a running event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._channel = FrameChannel(reader, writer)
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._next_stream_id = 1
        self._close_reason = "ttrpc connection closed"
        self.closed = asyncio.Event()
        """Set once the connection has ended; every call then fails with UNAVAILABLE."""
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="ttrpc-client-reader"
        )

    @classmethod
    async def connect_unix(cls, path: str) -> Client:
        """Connect to the ttrpc server at unix socket ``path`` (TtrpcError UNAVAILABLE if not)."""
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"failed to connect to {path}: {exc}") from exc
        return cls(reader, writer)

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> M:
        """Call ``service/method`` and return its decoded response; raises TtrpcError."""
        if self.closed.is_set():
            raise TtrpcError(Code.UNAVAILABLE, self._close_reason)
        payload = _request(service, method, request, timeout, metadata)
        stream_id = self._allocate_stream_id()
        future = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        try:
            async with asyncio.timeout(timeout):
                await self._send(stream_id, payload)
                response = await future
        except TimeoutError:
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response within {timeout}s"
            ) from None
        finally:
            self._pending.pop(stream_id, None)
        return _decode_response(response, response_type, f"{service}/{method}")

    async def close(self) -> None:
        """Close the connection; pending calls fail with UNAVAILABLE. Idempotent."""
        self._shutdown("ttrpc client closed")
        if not self._reader_task.done():
            self._reader_task.cancel()
            await asyncio.wait([self._reader_task])
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _allocate_stream_id(self) -> int:
        while True:
            stream_id = self._next_stream_id
            self._next_stream_id = stream_id + 2 if stream_id + 2 <= MAX_STREAM_ID else 1
            if stream_id not in self._pending:
                return stream_id

    async def _send(self, stream_id: int, payload: bytes) -> None:
        try:
            await self._channel.send(stream_id, MessageType.REQUEST, payload)
        except FrameTooLargeError as exc:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, str(exc)) from exc
        except OSError as exc:
            self._shutdown(f"ttrpc connection lost: {exc}")
            raise TtrpcError(Code.UNAVAILABLE, self._close_reason) from exc

    async def _read_loop(self) -> None:
        reason = "ttrpc connection closed by the server"
        try:
            while events := await self._channel.receive():
                for event in events:
                    self._on_event(event)
        except ProtocolError as exc:
            reason = f"ttrpc protocol error from the server: {exc}"
        except OSError as exc:
            reason = f"ttrpc connection lost: {exc}"
        finally:
            self._shutdown(reason)
            self._channel.abort()

    def _on_event(self, event: FrameEvent) -> None:
        future = self._pending.get(event.stream_id)
        if event.type is not MessageType.RESPONSE or future is None or future.done():
            return  # data frames, and answers nobody waits for any more
        if isinstance(event, OversizedFrame):
            future.set_exception(
                TtrpcError(Code.RESOURCE_EXHAUSTED, f"response of {event.length} bytes exceeds "
                                                     "the ttrpc limit")
            )
            return
        try:
            future.set_result(ttrpc_pb2.Response.FromString(event.payload))
        except DecodeError as exc:
            future.set_exception(TtrpcError(Code.INTERNAL, f"undecodable ttrpc response: {exc}"))

    def _shutdown(self, reason: str) -> None:
        """Mark the connection closed and fail every pending call (first reason wins)."""
        if self.closed.is_set():
            return
        self._close_reason = reason
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(TtrpcError(Code.UNAVAILABLE, reason))


def _request(
    service: str,
    method: str,
    request: Message,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
) -> bytes:
    message = ttrpc_pb2.Request(
        service=service,
        method=method,
        payload=request.SerializeToString(),
        timeout_nano=int(timeout * 1e9) if timeout is not None and timeout > 0 else 0,
    )
    for key, value in (metadata or {}).items():
        message.metadata.add(key=key, value=value)
    return message.SerializeToString()


def _decode_response(response: ttrpc_pb2.Response, response_type: type[M], what: str) -> M:
    if response.HasField("status") and response.status.code != Code.OK:
        raise TtrpcError(Code.from_wire(response.status.code), response.status.message)
    try:
        return response_type.FromString(response.payload)
    except DecodeError as exc:
        raise TtrpcError(Code.INTERNAL, f"cannot decode {what} response: {exc}") from exc
