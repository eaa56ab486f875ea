"""The vhost-user message layer: every handled request round trips, and bad input is refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisors.vsock.errors import VhostUserError
from hypervisors.vsock.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_MESSAGE,
    PROTOCOL_F_REPLY_ACK,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    DeviceConfig,
    MemoryRegion,
    MemoryTable,
    Message,
    NoPayload,
    Parser,
    Payload,
    Request,
    VringAddr,
    VringState,
    build_ack,
    build_reply,
    encode_message,
    needs_reply,
    vsock_config,
)

REGION = MemoryRegion(guest_addr=0, size=0x8000_0000, user_addr=0x7F12_3400_0000,
                      mmap_offset=0)

#: One valid message per handled request: (request, payload, fds it must carry).
CASES: list[tuple[Request, Payload, tuple[int, ...]]] = [
    (Request.GET_FEATURES, NoPayload(), ()),
    (Request.SET_FEATURES, U64(1 << 32 | 1 << 30), ()),
    (Request.SET_OWNER, NoPayload(), ()),
    (Request.RESET_OWNER, NoPayload(), ()),
    (Request.SET_MEM_TABLE, MemoryTable((REGION, MemoryRegion(1 << 32, 0x1000, 0x1000, 4096))),
     (10, 11)),
    (Request.SET_VRING_NUM, VringState(0, 128), ()),
    (Request.SET_VRING_ADDR, VringAddr(1, 0, 0x7F00, 0x8F00, 0x9F00, 0), ()),
    (Request.SET_VRING_BASE, VringState(1, 0), ()),
    (Request.GET_VRING_BASE, VringState(1, 0), ()),
    (Request.SET_VRING_KICK, U64(1), (12,)),
    (Request.SET_VRING_CALL, U64(2), (13,)),
    (Request.SET_VRING_ERR, U64(0 | VRING_NOFD_MASK), ()),
    (Request.GET_PROTOCOL_FEATURES, NoPayload(), ()),
    (Request.SET_PROTOCOL_FEATURES, U64(1 << PROTOCOL_F_REPLY_ACK), ()),
    (Request.GET_QUEUE_NUM, NoPayload(), ()),
    (Request.SET_VRING_ENABLE, VringState(0, 1), ()),
    (Request.GET_CONFIG, DeviceConfig(0, 0, bytes(8)), ()),
    (Request.SET_CONFIG, DeviceConfig(0, 1, b"\x03" + bytes(7)), ()),
    (Request.RESET_DEVICE, NoPayload(), ()),
]


def test_request_codes_match_vhost_user_rst() -> None:
    assert {r.name: r.value for r in Request} == {
        "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4,
        "SET_MEM_TABLE": 5, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10,
        "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13,
        "SET_VRING_ERR": 14, "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16,
        "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18, "GET_CONFIG": 24, "SET_CONFIG": 25,
        "RESET_DEVICE": 34}


@pytest.mark.parametrize("request_, payload, fds", CASES, ids=[c[0].name for c in CASES])
def test_every_request_round_trips(request_: Request, payload: Payload,
                                   fds: tuple[int, ...]) -> None:
    wire = encode_message(request_, payload, flags=VERSION | FLAG_NEED_REPLY)
    code, flags, size = struct.unpack_from("=III", wire)
    assert (code, flags, size) == (request_, 0x9, len(wire) - HEADER_SIZE)
    parser = Parser()
    assert parser.feed(wire, fds) == [Message(request_, payload, True, fds)]
    assert parser.pending_fds == ()


def test_payload_sizes_match_the_c_structs() -> None:
    sizes = {r: len(encode_message(r, p)) - HEADER_SIZE for r, p, _ in CASES}
    assert sizes[Request.SET_FEATURES] == 8
    assert sizes[Request.SET_VRING_NUM] == 8  # struct vhost_vring_state
    assert sizes[Request.SET_VRING_ADDR] == 40  # struct vhost_vring_addr
    assert sizes[Request.SET_MEM_TABLE] == 8 + 2 * 32  # nregions, padding, 2 regions
    assert sizes[Request.GET_CONFIG] == 12 + 8  # offset, size, flags + the CID


def test_messages_split_anywhere_and_batched_parse_the_same() -> None:
    stream = b"".join(encode_message(r, p) for r, p, _ in CASES)
    fds = [fd for _, _, f in CASES for fd in f]
    whole = Parser().feed(stream, fds)
    assert [m.request for m in whole] == [r for r, _, _ in CASES]
    parser, pieces = Parser(), []
    for i in range(len(stream)):
        # fds arrive with the first byte of their message, as SCM_RIGHTS does.
        starts = {sum(len(encode_message(r, p)) for r, p, _ in CASES[:k]): f
                  for k, (_, _, f) in enumerate(CASES)}
        pieces += parser.feed(stream[i:i + 1], starts.get(i, ()))
    assert pieces == whole


def test_replies_carry_the_reply_flag() -> None:
    reply = build_reply(Request.GET_FEATURES, U64(1 << 30))
    assert struct.unpack("=IIIQ", reply) == (1, VERSION | FLAG_REPLY, 8, 1 << 30)
    assert struct.unpack("=IIIQ", build_ack(Request.SET_MEM_TABLE, ok=False)) == \
        (5, 0x5, 8, 1)
    state = build_reply(Request.GET_VRING_BASE, VringState(1, 42))
    assert struct.unpack("=IIIII", state) == (11, 0x5, 8, 1, 42)


def test_which_requests_need_a_reply() -> None:
    ack = 1 << PROTOCOL_F_REPLY_ACK
    assert needs_reply(Message(Request.GET_FEATURES, NoPayload()), 0)
    assert needs_reply(Message(Request.GET_VRING_BASE, VringState(0, 0)), 0)
    assert not needs_reply(Message(Request.SET_OWNER, NoPayload(), need_reply=True), 0)
    assert needs_reply(Message(Request.SET_OWNER, NoPayload(), need_reply=True), ack)
    assert not needs_reply(Message(Request.SET_OWNER, NoPayload()), ack)


def test_vsock_config_is_the_little_endian_guest_cid() -> None:
    assert vsock_config(3, DeviceConfig(0, 0, bytes(8))).data == (3).to_bytes(8, "little")
    assert vsock_config(0x1_0000_0005, DeviceConfig(4, 0, bytes(4))).data == b"\x01\0\0\0"
    # A window past the 8 bytes gets the empty (error) answer vhost-user.rst defines.
    assert vsock_config(3, DeviceConfig(4, 0, bytes(8))).data == b""


def raw(code: int, flags: int, payload: bytes, size: int | None = None) -> bytes:
    return struct.pack("=III", code, flags, len(payload) if size is None else size) + payload


@pytest.mark.parametrize("data, fds, match", [
    (raw(99, 1, b""), (), "unsupported vhost-user request 99"),
    (raw(6, 1, bytes(16)), (), "unsupported"),  # SET_LOG_BASE: not offered
    (raw(1, 2, b""), (), "version 2"),
    (raw(1, 1 | FLAG_REPLY, b""), (), "unexpected flags"),
    (raw(1, 1, b"", size=8), (), "exceeds 0"),
    (raw(2, 1, b"", size=0xFFFFFFFF), (), "exceeds 8"),
    (raw(5, 1, b"", size=8 + 9 * 32), (), "exceeds"),
    (raw(24, 1, b"", size=12 + 257), (), "exceeds"),
    (raw(2, 1, bytes(4)), (), "expected 8"),
    (raw(9, 1, bytes(32)), (), "expected 40"),
    (raw(5, 1, struct.pack("=II", 9, 0)), (), "9 regions"),
    (raw(5, 1, struct.pack("=II", 2, 0) + bytes(32)), (), "2 regions in 40"),
    (raw(5, 1, struct.pack("=II", 0, 0) + bytes(32)), (), "0 regions in 40"),
    (raw(5, 1, struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, 0, 0, 0)), (5,), "empty"),
    (raw(5, 1, struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 2**64 - 1, 2, 0, 0)), (5,),
     "wraps"),
    (raw(5, 1, struct.pack("=II", 1, 0) + struct.pack("=QQQQ", 0, 4096, 0, 0)), (), "needs 1"),
    (raw(12, 1, struct.pack("=Q", 0)), (), "needs 1 fds"),
    (raw(24, 1, struct.pack("=III", 0, 9, 0) + bytes(8)), (), "config size 9"),
    (raw(24, 1, b"\0"), (), "truncated"),
    (raw(3, 1, b""), (7,), "no message"),
    (raw(12, 1, struct.pack("=Q", VRING_NOFD_MASK)), (7,), "no message"),
])
def test_malformed_messages_are_refused(data: bytes, fds: tuple[int, ...], match: str) -> None:
    parser = Parser()
    with pytest.raises(VhostUserError, match=match):
        parser.feed(data, fds)
    # The error is sticky: the connection must be dropped.
    with pytest.raises(VhostUserError):
        parser.feed(encode_message(Request.SET_OWNER, NoPayload()))


def test_an_oversized_size_is_refused_from_the_header_alone() -> None:
    parser = Parser()
    with pytest.raises(VhostUserError, match="exceeds"):
        parser.feed(raw(Request.SET_MEM_TABLE, 1, b"", size=1 << 31))


def test_a_truncated_message_waits_for_the_rest() -> None:
    wire = encode_message(Request.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 4))
    parser = Parser()
    assert parser.feed(wire[:HEADER_SIZE - 1]) == []
    assert parser.feed(wire[HEADER_SIZE - 1:-1]) == []
    assert parser.feed(wire[-1:]) == [
        Message(Request.SET_VRING_ADDR, VringAddr(0, 0, 1, 2, 3, 4))]


def test_fds_are_kept_for_the_caller_when_the_message_is_bad() -> None:
    parser = Parser()
    with pytest.raises(VhostUserError):
        parser.feed(raw(Request.SET_VRING_CALL, 1, bytes(4)), (21,))
    assert parser.pending_fds == (21,)
    with pytest.raises(VhostUserError):
        parser.feed(encode_message(Request.SET_VRING_KICK, U64(0)), (22,))
    assert parser.pending_fds == (21, 22)


def test_encoding_refuses_what_the_parser_would() -> None:
    with pytest.raises(VhostUserError):
        encode_message(Request.SET_MEM_TABLE, MemoryTable((REGION,) * 9))
    with pytest.raises(VhostUserError):
        encode_message(Request.SET_CONFIG, DeviceConfig(0, 0, bytes(257)))
    with pytest.raises(VhostUserError):
        encode_message(Request.SET_FEATURES, U64(-1))


@settings(max_examples=500)
@given(st.binary(max_size=MAX_MESSAGE + 16), st.lists(st.integers(3, 100), max_size=9))
def test_arbitrary_bytes_raise_only_vhost_user_errors(data: bytes, fds: list[int]) -> None:
    parser = Parser()
    try:
        messages = parser.feed(data, fds)
    except VhostUserError:
        return
    # What parsed re-encodes to a prefix of the input, and fds are never invented.
    consumed = b"".join(encode_message(m.request, m.payload,
                                       flags=VERSION | FLAG_NEED_REPLY * m.need_reply)
                        for m in messages)
    assert data.startswith(consumed)
    assert [fd for m in messages for fd in m.fds] + list(parser.pending_fds) == fds


U32 = st.integers(0, 0xFFFFFFFF)
U64S = st.integers(0, 2**64 - 1)
REGIONS = st.builds(MemoryRegion, st.integers(0, 2**40), st.integers(1, 2**40),
                    st.integers(0, 2**40), st.integers(0, 2**40))
PAYLOADS: dict[Request, st.SearchStrategy[Payload]] = {
    Request.SET_FEATURES: st.builds(U64, U64S),
    Request.SET_VRING_NUM: st.builds(VringState, U32, U32),
    Request.SET_VRING_ADDR: st.builds(VringAddr, U32, U32, U64S, U64S, U64S, U64S),
    Request.SET_MEM_TABLE: st.builds(MemoryTable, st.lists(REGIONS, max_size=8).map(tuple)),
    Request.SET_CONFIG: st.builds(DeviceConfig, U32, U32, st.binary(max_size=256)),
}


@given(st.sampled_from(sorted(PAYLOADS)).flatmap(
    lambda r: st.tuples(st.just(r), PAYLOADS[r])), st.booleans())
def test_build_then_parse_round_trips(case: tuple[Request, Payload], need_reply: bool) -> None:
    request, payload = case
    fds = tuple(range(100, 100 + len(payload.regions))) \
        if isinstance(payload, MemoryTable) else ()
    wire = encode_message(request, payload, flags=VERSION | FLAG_NEED_REPLY * need_reply)
    assert Parser().feed(wire, fds) == [Message(request, payload, need_reply, fds)]
