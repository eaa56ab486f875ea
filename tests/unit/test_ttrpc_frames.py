"""The sans-IO framing core: fed whole, byte by byte, with trailing data, and fuzzed."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrpc import frames
from ttrpc.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameEvent,
    FrameTooLargeError,
    MessageType,
    OversizedFrame,
    ProtocolError,
    encode_frame,
)

SIMPLE_CASES: list[tuple[bytes, Frame]] = [
    (b"\x00\x00\x00\x00\x00\x00\x00\x01\x01\x00", Frame(1, MessageType.REQUEST, b"")),
    (b"\x00\x00\x00\x03\x00\x00\x00\x02\x02\x00abc", Frame(2, MessageType.RESPONSE, b"abc")),
    (b"\x00\x00\x00\x01\xff\xff\xff\xff\x03\x05z", Frame(0xFFFFFFFF, MessageType.DATA, b"z", 5)),
]


def parse_whole(data: bytes) -> list[FrameEvent]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder.events())


def parse_bytewise(data: bytes) -> list[FrameEvent]:
    decoder = FrameDecoder()
    events: list[FrameEvent] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        events.extend(decoder.events())
    return events


def parse_split(data: bytes, cuts: list[int]) -> list[FrameEvent]:
    decoder = FrameDecoder()
    events: list[FrameEvent] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        decoder.feed(data[start:cut])
        events.extend(decoder.events())
        start = max(start, cut)
    return events


@pytest.mark.parametrize(("wire", "frame"), SIMPLE_CASES)
def test_simple_cases_whole_bytewise_and_trailing(wire: bytes, frame: Frame) -> None:
    assert parse_whole(wire) == [frame]
    assert parse_bytewise(wire) == [frame]
    decoder = FrameDecoder()
    decoder.feed(wire + wire[:7])  # trailing: a partial next header stays buffered
    assert list(decoder.events()) == [frame]
    assert decoder.buffered == 7


@pytest.mark.parametrize(("wire", "frame"), SIMPLE_CASES)
def test_encode_matches_wire(wire: bytes, frame: Frame) -> None:
    assert encode_frame(frame.stream_id, frame.type, frame.payload, frame.flags) == wire


def test_need_data_returns_none() -> None:
    decoder = FrameDecoder()
    assert decoder.next_event() is None
    decoder.feed(encode_frame(1, MessageType.REQUEST, b"hello")[:-1])
    assert decoder.next_event() is None
    decoder.feed(b"o")
    assert decoder.next_event() == Frame(1, MessageType.REQUEST, b"hello")


def test_unknown_type_is_a_sticky_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00\x00\x00\x00\x01\x07\x00")
    with pytest.raises(ProtocolError, match="0x7"):
        decoder.next_event()
    decoder.feed(encode_frame(3, MessageType.REQUEST, b""))
    with pytest.raises(ProtocolError):
        decoder.next_event()


def test_oversized_frame_is_reported_then_skipped_in_sync() -> None:
    big = struct.pack(">IIBB", MAX_PAYLOAD + 1, 5, 1, 0) + b"x" * (MAX_PAYLOAD + 1)
    after = encode_frame(7, MessageType.REQUEST, b"next")
    expected = [
        OversizedFrame(5, MessageType.REQUEST, MAX_PAYLOAD + 1),
        Frame(7, MessageType.REQUEST, b"next"),
    ]
    assert parse_whole(big + after) == expected
    assert parse_split(big + after, [3, 11, 4096, MAX_PAYLOAD, MAX_PAYLOAD + 11]) == expected


def test_small_limit_bytewise() -> None:
    data = encode_frame(1, MessageType.REQUEST, b"0123456789") + encode_frame(
        3, MessageType.REQUEST, b"ok"
    )
    decoder = FrameDecoder(max_payload=4)
    events: list[FrameEvent] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        events.extend(decoder.events())
    assert events == [
        OversizedFrame(1, MessageType.REQUEST, 10),
        Frame(3, MessageType.REQUEST, b"ok"),
    ]


def test_encode_refuses_oversized_payload() -> None:
    encode_frame(1, MessageType.REQUEST, b"x" * MAX_PAYLOAD)  # exactly the limit is fine
    with pytest.raises(FrameTooLargeError):
        encode_frame(1, MessageType.REQUEST, b"x" * (MAX_PAYLOAD + 1))


def test_encode_refuses_bad_header_values() -> None:
    with pytest.raises(ValueError, match="stream id"):
        encode_frame(1 << 32, MessageType.REQUEST, b"")
    with pytest.raises(ValueError, match="flags"):
        encode_frame(1, MessageType.REQUEST, b"", flags=256)


def test_core_is_sans_io() -> None:
    tree = ast.parse(Path(frames.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"asyncio", "socket", "selectors", "trio"}


# ---- property tests -------------------------------------------------------------------------

SMALL_LIMIT = 64

frame_strategy = st.builds(
    Frame,
    stream_id=st.integers(0, 0xFFFFFFFF),
    type=st.sampled_from(MessageType),
    payload=st.binary(max_size=SMALL_LIMIT),
    flags=st.integers(0, 255),
)


@given(st.binary(max_size=512))
@settings(max_examples=300)
def test_arbitrary_bytes_yield_frames_or_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=SMALL_LIMIT)
    decoder.feed(data)
    try:
        for event in decoder.events():
            assert isinstance(event, Frame | OversizedFrame)
    except ProtocolError:
        pass


@given(frame_strategy)
def test_encode_decode_round_trip(frame: Frame) -> None:
    wire = encode_frame(frame.stream_id, frame.type, frame.payload, frame.flags)
    assert len(wire) == HEADER_SIZE + len(frame.payload)
    assert parse_whole(wire) == [frame]


@given(
    st.lists(frame_strategy, max_size=8),
    st.lists(st.integers(0, 800), max_size=12),
    st.binary(max_size=SMALL_LIMIT * 2),
)
def test_any_split_yields_the_same_events(
    frame_list: list[Frame], cuts: list[int], oversized_payload: bytes
) -> None:
    oversized = b""
    if len(oversized_payload) > SMALL_LIMIT:  # sometimes mix in a frame to be skipped
        oversized = struct.pack(">IIBB", len(oversized_payload), 9, 1, 0) + oversized_payload
    wire = oversized + b"".join(
        encode_frame(f.stream_id, f.type, f.payload, f.flags) for f in frame_list
    )
    whole = FrameDecoder(max_payload=SMALL_LIMIT)
    whole.feed(wire)
    expected = list(whole.events())
    assert [e for e in expected if isinstance(e, Frame)] == frame_list
    split = FrameDecoder(max_payload=SMALL_LIMIT)
    got: list[FrameEvent] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(wire)), len(wire)]:
        split.feed(wire[start:cut])
        got.extend(split.events())
        start = cut
    assert got == expected
    assert split.buffered == 0
