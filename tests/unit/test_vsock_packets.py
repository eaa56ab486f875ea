"""The virtio-vsock packet header: layout, validation, and round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisors.vsock.errors import PacketError
from hypervisors.vsock.packets import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Op,
    Packet,
    Shutdown,
    Type,
    build,
    parse,
    payload_length,
)


def test_header_layout_matches_virtio_vsock_hdr() -> None:
    packet = Packet(src_cid=3, dst_cid=2, src_port=1024, dst_port=0x40000000, op=Op.RW,
                    flags=0, buf_alloc=262144, fwd_cnt=17, payload=b"hi")
    wire = build(packet)
    assert HEADER_SIZE == 44 and len(wire) == 46
    # Offsets from struct virtio_vsock_hdr (packed, little-endian).
    assert struct.unpack_from("<Q", wire, 0)[0] == 3
    assert struct.unpack_from("<Q", wire, 8)[0] == 2
    assert struct.unpack_from("<I", wire, 16)[0] == 1024
    assert struct.unpack_from("<I", wire, 20)[0] == 0x40000000
    assert struct.unpack_from("<I", wire, 24)[0] == 2  # len
    assert struct.unpack_from("<H", wire, 28)[0] == 1  # type STREAM
    assert struct.unpack_from("<H", wire, 30)[0] == 5  # op RW
    assert struct.unpack_from("<I", wire, 32)[0] == 0  # flags
    assert struct.unpack_from("<I", wire, 36)[0] == 262144  # buf_alloc
    assert struct.unpack_from("<I", wire, 40)[0] == 17  # fwd_cnt
    assert wire[44:] == b"hi"
    assert parse(wire) == packet


def test_op_and_flag_values_match_the_spec() -> None:
    assert [op.value for op in Op] == [1, 2, 3, 4, 5, 6, 7]
    assert [op.name for op in Op] == ["REQUEST", "RESPONSE", "RST", "SHUTDOWN", "RW",
                                      "CREDIT_UPDATE", "CREDIT_REQUEST"]
    assert (Type.STREAM, Shutdown.RCV, Shutdown.SEND) == (1, 1, 2)


def header(*, length: int = 0, type_: int = 1, op: int = 5, flags: int = 0) -> bytes:
    return struct.pack("<QQIIIHHIII", 3, 2, 1, 2, length, type_, op, flags, 0, 0)


@pytest.mark.parametrize("data, match", [
    (header()[:43], "shorter"),
    (header(length=5) + b"abc", "len 5"),
    (header(length=1), "len 1"),
    (header(length=0) + b"x", "len 0"),
    (header(op=0), "unknown vsock op 0"),
    (header(op=8), "unknown vsock op 8"),
    (header(type_=2), "socket type 2"),
    (header(op=Op.REQUEST, length=1) + b"x", "REQUEST carries"),
    (header(op=Op.SHUTDOWN, flags=4), "shutdown flags"),
    (header(length=MAX_PAYLOAD + 1) + bytes(MAX_PAYLOAD + 1), "exceeds"),
])
def test_malformed_packets_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(PacketError, match=match):
        parse(data)


def test_payload_length_is_bounded_before_the_payload_is_read() -> None:
    assert payload_length(header(length=100)) == 100
    with pytest.raises(PacketError):
        payload_length(header(length=0xFFFFFFFF))
    with pytest.raises(PacketError):
        payload_length(b"\0" * 10)


def test_build_refuses_what_parse_would() -> None:
    with pytest.raises(PacketError):
        build(Packet(3, 2, 1, 2, Op.RESPONSE, payload=b"x"))
    with pytest.raises(PacketError):
        build(Packet(1 << 64, 2, 1, 2, Op.RW))
    with pytest.raises(PacketError):
        build(Packet(3, 2, 1, 2, Op.SHUTDOWN, flags=8))


def test_reply_swaps_the_addresses() -> None:
    request = Packet(3, 2, 1234, 1024, Op.REQUEST, buf_alloc=10)
    rst = request.reply(Op.RST)
    assert (rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port, rst.op) == \
        (2, 3, 1024, 1234, Op.RST)


U32 = st.integers(0, 0xFFFFFFFF)
PACKETS = st.builds(
    lambda s, d, sp, dp, op, flags, ba, fc, payload: Packet(
        s, d, sp, dp, op, Type.STREAM, flags if op == Op.SHUTDOWN else ba & 0xFF, ba, fc,
        payload if op == Op.RW else b""),
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), U32, U32, st.sampled_from(Op),
    st.integers(0, 3), U32, U32, st.binary(max_size=512))


@given(PACKETS)
def test_build_then_parse_round_trips(packet: Packet) -> None:
    assert parse(build(packet)) == packet


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_packet_errors(data: bytes) -> None:
    try:
        packet = parse(data)
    except PacketError:
        return
    assert build(packet) == data


@given(PACKETS, st.integers(0, 43))
def test_truncated_packets_are_refused(packet: Packet, cut: int) -> None:
    with pytest.raises(PacketError):
        parse(build(packet)[:cut])
