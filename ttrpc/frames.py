"""Sans-IO ttrpc framing: bytes in, frame events out; frames in, bytes out.

Theory of operation
-------------------
Every ttrpc message is one frame: a 10-byte header followed by ``length`` bytes of payload::

    uint32 BE length | uint32 BE stream id | u8 type | u8 flags | payload[length]

Types are 1 (request), 2 (response) and 3 (data, streaming only; callers ignore it). Unary
calls use flags 0. This module does no I/O and imports neither asyncio nor socket: the
connection code feeds whatever bytes it read into :meth:`FrameDecoder.feed` and then drains
:meth:`FrameDecoder.next_event` until it returns ``None`` (need more data). Any split of the
same byte stream yields the same events.

Rules:

1. A payload is at most :data:`MAX_PAYLOAD` (4 MiB) bytes. An oversized incoming frame is
   reported as :class:`OversizedFrame` as soon as its header arrives, and its payload bytes are
   then skipped as they come in, so the stream stays in sync and the peer can be told
   ``RESOURCE_EXHAUSTED`` on that stream id. :func:`encode_frame` refuses an oversized payload
   with :class:`FrameTooLargeError`.
2. A header with an unknown type is garbage: :class:`ProtocolError` is raised, and is raised
   again by every later call (the error is sticky; the connection must be dropped).
3. Stream id policy (odd ids for client requests) is the connection's business, not this
   module's: the decoder reports every id as it is.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import NamedTuple

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 4 << 20
MAX_STREAM_ID = 0xFFFFFFFF


class MessageType(enum.IntEnum):
    """The frame type byte."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class ProtocolError(Exception):
    """The peer sent bytes that are not ttrpc frames; drop the connection."""


class FrameTooLargeError(ValueError):
    """An outgoing payload exceeds :data:`MAX_PAYLOAD`."""


# Frames are NamedTuples, not frozen dataclasses: defining a dataclass compiles its methods
# (~1 ms each on the host, ~20 ms under TCG), which the guest agent pays at every start-up.
class Frame(NamedTuple):
    """One complete frame."""

    stream_id: int
    type: MessageType
    payload: bytes
    flags: int = 0


class OversizedFrame(NamedTuple):
    """A frame whose payload (``length`` bytes) exceeds the limit; its bytes are skipped."""

    stream_id: int
    type: MessageType
    length: int
    flags: int = 0


FrameEvent = Frame | OversizedFrame


def encode_frame(
    stream_id: int,
    msg_type: MessageType,
    payload: bytes,
    flags: int = 0,
    *,
    max_payload: int = MAX_PAYLOAD,
) -> bytes:
    """The bytes of one frame; raises FrameTooLargeError for a payload over ``max_payload``."""
    if len(payload) > max_payload:
        raise FrameTooLargeError(
            f"ttrpc payload of {len(payload)} bytes exceeds the {max_payload}-byte limit"
        )
    if not 0 <= stream_id <= MAX_STREAM_ID or not 0 <= flags <= 0xFF:
        raise ValueError(f"invalid frame header: stream id {stream_id}, flags {flags}")
    return HEADER.pack(len(payload), stream_id, msg_type, flags) + payload


class FrameDecoder:
    """Incremental frame parser: :meth:`feed` bytes, then drain :meth:`next_event`."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to discard
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as (part of) an event."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes (discarding those of an oversized frame being skipped)."""
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buffer += data

    def next_event(self) -> FrameEvent | None:
        """The next complete event, or None when more data is needed.

        Raises ProtocolError (stickily) when the stream holds garbage.
        """
        if self._error is not None:
            raise self._error
        if self._skip or len(self._buffer) < HEADER_SIZE:
            return None
        length, stream_id, type_byte, flags = HEADER.unpack_from(self._buffer)
        msg_type = self._message_type(type_byte, stream_id)
        if length > self._max_payload:
            return self._start_skip(length, stream_id, msg_type, flags)
        end = HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return Frame(stream_id, msg_type, payload, flags)

    def events(self) -> Iterator[FrameEvent]:
        """Every complete event currently buffered (see :meth:`next_event`)."""
        while (event := self.next_event()) is not None:
            yield event

    def _message_type(self, type_byte: int, stream_id: int) -> MessageType:
        try:
            return MessageType(type_byte)
        except ValueError:
            self._error = ProtocolError(
                f"unknown ttrpc message type {type_byte:#x} on stream {stream_id}"
            )
            raise self._error from None

    def _start_skip(
        self, length: int, stream_id: int, msg_type: MessageType, flags: int
    ) -> OversizedFrame:
        del self._buffer[:HEADER_SIZE]
        buffered = min(length, len(self._buffer))
        del self._buffer[:buffered]
        self._skip = length - buffered
        return OversizedFrame(stream_id, msg_type, length, flags)
