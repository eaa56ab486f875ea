"""asyncio ttrpc server: concurrent unary calls on every connection.

Theory of operation
-------------------
:meth:`Server.register` maps ``(service, method)`` to ``(RequestType, handler)``; a handler is
``async def handler(request: RequestType) -> ResponseMessage`` (or the message's encoding,
or a :class:`~ttrpc.pipepayload.PipePayload` whose bulk waits in a pipe and is spliced into
the connection). Each connection is served by
:meth:`Server.serve_connection`, which runs one read loop and, per request frame, one task:

1. the read loop turns bytes into frames (:class:`~ttrpc.channel.FrameChannel`) and dispatches
   them without waiting on handlers, so a long ``Wait`` never blocks other calls;
2. each request task decodes ``ttrpc.Request`` and its payload, awaits the handler and writes
   one Response frame; responses therefore go out in completion order, whole frames under
   the connection's write lock.

Status mapping (the stream id of the request is always echoed):

=====================================================  ==========================
request on an even stream id                           INVALID_ARGUMENT
frame over 4 MiB (skipped, connection stays in sync)   RESOURCE_EXHAUSTED
undecodable Request or request payload                 INVALID_ARGUMENT
unknown service or method                              UNIMPLEMENTED
handler raises ``TtrpcError(code, msg)``               that code and message
handler raises anything else (logged)                  UNKNOWN, ``str(exc)``
response over 4 MiB                                    RESOURCE_EXHAUSTED
=====================================================  ==========================

Response and data frames from the client are ignored; garbage (a bad frame type) ends the
connection. When a connection ends, its in-flight handlers are cancelled. The request's
metadata and timeout are visible to handlers through :func:`current_request`; the timeout is
not enforced (ttrpc has no cancel frame and containerd does not rely on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from google.protobuf.message import DecodeError, Message

from protocols import rpc_status_pb2, ttrpc_pb2
from ttrpc import wire
from ttrpc.channel import FrameChannel
from ttrpc.errors import Code, TtrpcError
from ttrpc.frames import (
    Frame,
    FrameEvent,
    FrameTooLargeError,
    MessageType,
    OversizedFrame,
    ProtocolError,
)
from ttrpc.pipepayload import PipePayload

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

#: A handler answers with a message, or with its encoding when building the message would
#: only copy bytes it already has, or with a PipePayload when most of the encoding waits in
#: a pipe (the agent's stream reads: agent/service.py, ttrpc/pipepayload.py).
Handler = Callable[[Any], Awaitable[Message | bytes | PipePayload]]
Method = tuple[type[Message], Handler]


class RequestInfo(NamedTuple):  # not a dataclass: see ttrpc.frames.Frame
    """What a handler may want to know about the call it serves."""

    service: str
    method: str
    metadata: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    timeout_nano: int = 0


_current_request: contextvars.ContextVar[RequestInfo] = contextvars.ContextVar("ttrpc_request")


def current_request() -> RequestInfo:
    """The call being served by the current handler task (LookupError outside a handler)."""
    return _current_request.get()


class Server:
    """A registry of services, served on any number of connections."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], Method] = {}

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        """Serve ``methods`` (name -> (RequestType, handler)) under the full ``service`` name."""
        for name, method in methods.items():
            if (service, name) in self._methods:
                raise ValueError(f"ttrpc method {service}/{name} is already registered")
            self._methods[(service, name)] = method

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection until the peer closes it (or this task is cancelled)."""
        await _Connection(self._methods, FrameChannel(reader, writer)).run()

    async def serve_listener(self, sock: socket.socket) -> None:
        """Accept and serve connections on a listening unix socket until cancelled.

        On cancellation the listener stops and every connection it accepted is closed.
        """
        connections: set[asyncio.Task[None]] = set()

        async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                # Cancelled only by this listener's shutdown; swallowed because asyncio 3.11's
                # start_server callback logs an error for a cancelled connection task.
                with contextlib.suppress(asyncio.CancelledError):
                    await self.serve_connection(reader, writer)
            finally:
                connections.discard(task)

        listener = await asyncio.start_unix_server(on_accept, sock=sock)
        try:
            await listener.serve_forever()
        finally:
            listener.close()
            await _cancel_all(connections)


class _Connection:
    """The read loop and request tasks of one server connection."""

    def __init__(self, methods: Mapping[tuple[str, str], Method], channel: FrameChannel) -> None:
        self._methods = methods
        self._channel = channel
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            await self._read_loop()
        except ProtocolError as exc:
            log.warning("ttrpc: dropping connection: %s", exc)
        except OSError as exc:
            log.debug("ttrpc: connection lost: %s", exc)
        finally:
            await _cancel_all(self._tasks)
            await self._channel.close()

    async def _read_loop(self) -> None:
        while events := await self._channel.receive():
            for event in events:
                self._dispatch(event)

    def _dispatch(self, event: FrameEvent) -> None:
        if event.type is not MessageType.REQUEST:
            return  # responses and streaming data are not ours to handle
        if isinstance(event, OversizedFrame):
            error = TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"message of {event.length} bytes exceeds the ttrpc limit",
            )
            self._spawn(self._reply(event.stream_id, b"", error))
        elif event.stream_id % 2 == 0:
            error = TtrpcError(Code.INVALID_ARGUMENT, f"invalid stream id {event.stream_id}")
            self._spawn(self._reply(event.stream_id, b"", error))
        else:
            self._spawn(self._handle(event))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, frame: Frame) -> None:
        payload: bytes | PipePayload = b""
        error = None
        try:
            payload = await self._call(frame.payload)
        except TtrpcError as exc:
            error = exc
        except Exception as exc:
            info = _current_request.get(None)
            name = f"{info.service}/{info.method}" if info else "request"
            log.exception("ttrpc: %s failed", name)
            error = TtrpcError(Code.UNKNOWN, str(exc))
        try:
            await self._reply(frame.stream_id, payload, error)
        finally:
            if isinstance(payload, PipePayload):
                payload.release()

    async def _call(self, data: bytes) -> bytes | PipePayload:
        request = _decode(ttrpc_pb2.Request, data, "ttrpc request")
        method = self._methods.get((request.service, request.method))
        if method is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"{request.service}/{request.method}")
        request_type, handler = method
        message = _decode(request_type, request.payload, f"{request.method} request")
        _current_request.set(_request_info(request))
        response = await handler(message)
        if isinstance(response, bytes | PipePayload):
            return response
        return response.SerializeToString()

    async def _reply(self, stream_id: int, payload: bytes | PipePayload,
                     error: TtrpcError | None) -> None:
        try:
            if isinstance(payload, PipePayload):
                prefix = wire.field_prefix(wire.RESPONSE_PAYLOAD, len(payload))
                await self._channel.send_pipe_payload(stream_id, MessageType.RESPONSE, prefix,
                                                      payload)
            else:
                await self._channel.send(stream_id, MessageType.RESPONSE,
                                         _response(payload, error))
        except FrameTooLargeError as exc:
            too_large = TtrpcError(Code.RESOURCE_EXHAUSTED, str(exc))
            await self._reply(stream_id, b"", too_large)
        except OSError as exc:
            log.debug("ttrpc: cannot answer stream %d: %s", stream_id, exc)


def _decode(message_type: type[M], data: bytes, what: str) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"cannot decode {what}: {exc}") from exc


def _request_info(request: ttrpc_pb2.Request) -> RequestInfo:
    metadata: dict[str, tuple[str, ...]] = {}
    for pair in request.metadata:
        metadata[pair.key] = (*metadata.get(pair.key, ()), pair.value)
    return RequestInfo(request.service, request.method, metadata, request.timeout_nano)


def _response(payload: bytes, error: TtrpcError | None) -> bytes:
    if error is None:
        return wire.ttrpc_response(payload)  # what protobuf writes, with one copy less
    response = ttrpc_pb2.Response(payload=payload)
    response.status.CopyFrom(rpc_status_pb2.Status(code=error.code, message=error.message))
    return response.SerializeToString()


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they have finished."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
