"""A lying agent, for end-to-end tests of the host's defences from a real guest.

``KATA_AGENT_HOSTILE=<mode>:<method>`` on the guest kernel command line (the kernel hands it
to /init's environment) makes the agent serve normally until the host first calls
``<method>`` (e.g. ``ListProcesses``), and then, instead of answering it:

* ``oversized``: a 64 MiB reply (16 times the frame limit), then serves on;
* ``stray``: a well-formed reply to a request never sent, no answer to the real one, then
  serves on;
* ``garbage``: 64 KiB of random bytes, then answers nothing more;
* ``flood``: well-formed replies to requests never sent, without end;
* ``silent``: no answer, to this or anything after it.

This gives a guest no power it lacks: root in the VM can replace the agent and do all of
this. The switch only lets a test drive the host through the real VM, virtio-serial and
shim. Only the configuration (``kernel_params``) sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

from protocols import ttrpc_pb2
from ttrpc.frames import HEADER, MAX_PAYLOAD, Frame, FrameDecoder, MessageType, encode_frame

ENV = "KATA_AGENT_HOSTILE"
MODES = ("oversized", "garbage", "stray", "flood", "silent")
LIE_ONCE = ("oversized", "stray")  # the stream stays well-formed: serve on afterwards
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]  # ServeFn


def from_environment() -> tuple[str, str] | None:
    """(mode, method) when the switch is set and valid, else None."""
    mode, _, method = os.environ.get(ENV, "").partition(":")
    return (mode, method) if mode in MODES and method else None


def wrap(handler: Handler, mode: str, method: str) -> Handler:
    """A connection handler that serves through `handler` until `method` is called."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inner = asyncio.StreamReader()
        served = asyncio.ensure_future(handler(inner, writer))
        try:
            await _relay(reader, inner, writer, mode, method)
        finally:
            inner.feed_eof()
            served.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await served

    return serve


async def _relay(reader: asyncio.StreamReader, inner: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, mode: str, method: str) -> None:
    decoder = FrameDecoder()
    while data := await reader.read(65536):
        decoder.feed(data)
        for event in decoder.events():
            if not isinstance(event, Frame):
                continue
            if method and event.type == MessageType.REQUEST and _method(event.payload) == method:
                await _misbehave(mode, event.stream_id, writer)
                if mode in LIE_ONCE:
                    method = ""  # one lie, then an honest agent again
                    continue
                await _drain_forever(reader)
                return
            inner.feed_data(encode_frame(event.stream_id, event.type, event.payload,
                                         event.flags))


def _method(payload: bytes) -> str:
    request = ttrpc_pb2.Request()
    with contextlib.suppress(Exception):
        request.ParseFromString(payload)
    return request.method


def _reply(stream_id: int) -> bytes:
    return encode_frame(stream_id, MessageType.RESPONSE, ttrpc_pb2.Response().SerializeToString())


async def _misbehave(mode: str, stream_id: int, writer: asyncio.StreamWriter) -> None:
    stray = (stream_id + 1000) | 1  # odd, as client-initiated streams are, and never used
    if mode == "oversized":
        writer.write(HEADER.pack(64 << 20, stream_id, MessageType.RESPONSE, 0))
        chunk = bytes(1 << 20)
        for _ in range(64):
            writer.write(chunk)
            await writer.drain()
    elif mode == "garbage":
        writer.write(os.urandom(64 << 10))
    elif mode == "stray":
        writer.write(_reply(stray))
    elif mode == "flood":
        filler = encode_frame(stray, MessageType.RESPONSE, bytes(MAX_PAYLOAD // 4))
        while True:  # until the host hangs up (drain raises) or the VM ends
            writer.write(filler)
            await writer.drain()
    await writer.drain()


async def _drain_forever(reader: asyncio.StreamReader) -> None:
    """Keep the connection open and read (and ignore) the host until it hangs up."""
    while await reader.read(65536):
        pass
