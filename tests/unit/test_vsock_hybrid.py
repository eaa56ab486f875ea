"""The hybrid-vsock handshake: ``CONNECT <port>\\n`` in, ``OK <port>\\n`` back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisors.vsock.errors import HandshakeError
from hypervisors.vsock.hybrid import (
    MAX_LINE,
    ConnectReader,
    Line,
    OkReader,
    format_connect,
    format_ok,
)


def test_the_wire_text_is_firecrackers() -> None:
    assert format_connect(1024) == b"CONNECT 1024\n"
    assert format_ok(1073741824) == b"OK 1073741824\n"  # the example in docs/vsock.md


def test_connect_line_split_over_reads_and_data_after_it_is_kept() -> None:
    reader = ConnectReader()
    assert reader.feed(b"CONN") is None
    assert reader.feed(b"ECT 52") is None
    assert reader.feed(b"\nfirst payload") == Line(52, b"first payload")
    with pytest.raises(HandshakeError, match="already"):
        reader.feed(b"more")


def test_keyword_is_case_insensitive_like_firecracker() -> None:
    assert ConnectReader().feed(b"connect 7\n") == Line(7, b"")
    assert OkReader().feed(b"OK 1073741825\n") == Line(1073741825, b"")


@pytest.mark.parametrize("data, match", [
    (b"CONNECT\n", "expected"),
    (b"CONNECT 1 2\n", "expected"),
    (b"OK 1\n", "expected"),
    (b"CONNECT -1\n", "decimal"),
    (b"CONNECT 0x10\n", "decimal"),
    (b"CONNECT \xd9\xa1\n", "decimal"),
    (b"CONNECT 4294967296\n", "32 bits"),
    (b"CONNECT " + b"1" * 40, "no newline"),
    (b"CONNECT " + b" " * 30 + b"1\n", "longer"),
])
def test_anything_else_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(HandshakeError, match=match):
        ConnectReader().feed(data)


def test_ok_reader_refuses_a_connect_line() -> None:
    with pytest.raises(HandshakeError):
        OkReader().feed(b"CONNECT 5\n")


def test_formatting_refuses_ports_beyond_32_bits() -> None:
    with pytest.raises(HandshakeError):
        format_connect(1 << 32)
    with pytest.raises(HandshakeError):
        format_ok(-1)


@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=64))
def test_format_then_read_round_trips(port: int, rest: bytes) -> None:
    assert ConnectReader().feed(format_connect(port) + rest) == Line(port, rest)
    assert OkReader().feed(format_ok(port) + rest) == Line(port, rest)


@given(st.lists(st.binary(max_size=20), max_size=10))
def test_arbitrary_bytes_raise_only_handshake_errors_and_stay_bounded(
        chunks: list[bytes]) -> None:
    reader = ConnectReader()
    fed = b""
    try:
        for chunk in chunks:
            fed += chunk
            line = reader.feed(chunk)
            if line is not None:
                assert fed.index(b"\n") < MAX_LINE
                return
            # Still waiting: never more than a line's worth buffered.
            assert len(fed) < MAX_LINE
    except HandshakeError:
        pass
