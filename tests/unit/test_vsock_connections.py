"""One vsock stream: connect, data with credit flow control, shutdown and reset."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisors.vsock.connections import (
    Closed,
    Connected,
    Connection,
    CreditAvailable,
    DataReceived,
    PeerShutdown,
    Refused,
    Reset,
    State,
    refuse,
)
from hypervisors.vsock.errors import ConnectionStateError
from hypervisors.vsock.packets import HOST_CID, MAX_PAYLOAD, Op, Packet, Shutdown

GUEST_CID, GUEST_PORT, HOST_PORT = 3, 1024, 0x4000_0000


def from_guest(op: Op, *, payload: bytes = b"", flags: int = 0, buf_alloc: int = 1000,
               fwd_cnt: int = 0) -> Packet:
    return Packet(GUEST_CID, HOST_CID, GUEST_PORT, HOST_PORT, op, flags=flags,
                  buf_alloc=buf_alloc, fwd_cnt=fwd_cnt, payload=payload)


def established(*, buf_alloc: int = 100, peer_buf_alloc: int = 1000) -> Connection:
    conn = Connection.connect(HOST_PORT, GUEST_CID, GUEST_PORT, buf_alloc=buf_alloc)
    conn.packets_to_send()
    assert conn.receive(from_guest(Op.RESPONSE, buf_alloc=peer_buf_alloc)) == [
        Connected(), CreditAvailable(peer_buf_alloc)]
    return conn


def test_host_connect_sends_request_and_response_connects() -> None:
    conn = Connection.connect(HOST_PORT, GUEST_CID, GUEST_PORT, buf_alloc=4096)
    [request] = conn.packets_to_send()
    assert (request.op, request.src_cid, request.dst_cid, request.src_port,
            request.dst_port, request.buf_alloc, request.fwd_cnt) == \
        (Op.REQUEST, HOST_CID, GUEST_CID, HOST_PORT, GUEST_PORT, 4096, 0)
    assert conn.state == State.CONNECTING
    assert conn.receive(from_guest(Op.RESPONSE, buf_alloc=500)) == [Connected(),
                                                                   CreditAvailable(500)]
    assert conn.state == State.ESTABLISHED and conn.peer_free() == 500


def test_rst_to_a_request_means_refused() -> None:
    conn = Connection.connect(HOST_PORT, GUEST_CID, GUEST_PORT)
    assert conn.receive(from_guest(Op.RST)) == [Refused()]
    assert conn.state == State.CLOSED
    assert conn.packets_to_send()[1:] == []  # only the REQUEST; never an RST to an RST


def test_anything_else_while_connecting_resets() -> None:
    conn = Connection.connect(HOST_PORT, GUEST_CID, GUEST_PORT)
    conn.packets_to_send()
    [event] = conn.receive(from_guest(Op.RW, payload=b"x"))
    assert isinstance(event, Reset) and not event.by_peer
    assert [p.op for p in conn.packets_to_send()] == [Op.RST]


def test_send_never_exceeds_the_peer_credit_and_update_recovers() -> None:
    conn = established(peer_buf_alloc=10)
    assert conn.send(b"0123456789abcdef") == 10
    [rw] = conn.packets_to_send()
    assert rw.op == Op.RW and rw.payload == b"0123456789"
    assert conn.peer_free() == 0 and conn.send(b"abcdef") == 0
    conn.request_credit()
    assert [p.op for p in conn.packets_to_send()] == [Op.CREDIT_REQUEST]
    # The guest consumed 6 bytes: credit for 6 more.
    assert conn.receive(from_guest(Op.CREDIT_UPDATE, buf_alloc=10, fwd_cnt=6)) == [
        CreditAvailable(6)]
    assert conn.send(b"abcdef") == 6
    assert conn.peer_free() == 0


def test_a_shrinking_or_lying_peer_gives_zero_credit_not_negative() -> None:
    conn = established(peer_buf_alloc=10)
    conn.send(b"x" * 10)
    conn.receive(from_guest(Op.CREDIT_UPDATE, buf_alloc=4, fwd_cnt=0))
    assert conn.peer_free() == 0
    conn.receive(from_guest(Op.CREDIT_UPDATE, buf_alloc=4, fwd_cnt=50))  # more than we sent
    assert conn.peer_free() == 0
    assert conn.send(b"y") == 0


def test_credit_counters_wrap_at_32_bits() -> None:
    conn = established(peer_buf_alloc=100)
    conn.tx_cnt = conn.peer_fwd_cnt = 0xFFFF_FFF0
    assert conn.send(b"z" * 40) == 40
    assert conn.tx_cnt == 0x18
    assert conn.peer_free() == 60
    conn.receive(from_guest(Op.CREDIT_UPDATE, buf_alloc=100, fwd_cnt=0x18))
    assert conn.peer_free() == 100


def test_large_sends_are_split_into_max_payload_packets() -> None:
    conn = established(peer_buf_alloc=3 * MAX_PAYLOAD)
    assert conn.send(bytes(2 * MAX_PAYLOAD + 5)) == 2 * MAX_PAYLOAD + 5
    assert [len(p.payload) for p in conn.packets_to_send()] == [MAX_PAYLOAD, MAX_PAYLOAD, 5]


def test_received_data_is_bounded_by_our_buffer() -> None:
    conn = established(buf_alloc=100)
    assert conn.receive(from_guest(Op.RW, payload=b"a" * 60)) == [DataReceived(b"a" * 60)]
    assert conn.receive(from_guest(Op.RW, payload=b"b" * 40)) == [DataReceived(b"b" * 40)]
    assert conn.buffered() == 100
    [event] = conn.receive(from_guest(Op.RW, payload=b"c"))
    assert isinstance(event, Reset) and "credit" in event.reason and not event.by_peer
    assert conn.state == State.CLOSED
    assert [p.op for p in conn.packets_to_send()] == [Op.RST]


def test_consuming_data_grants_credit_back() -> None:
    conn = established(buf_alloc=100)
    conn.receive(from_guest(Op.RW, payload=b"a" * 100))
    conn.consumed(30)  # the guest still thinks 0 free: time to tell it
    [update] = conn.packets_to_send()
    assert (update.op, update.buf_alloc, update.fwd_cnt) == (Op.CREDIT_UPDATE, 100, 30)
    assert conn.receive(from_guest(Op.RW, payload=b"b" * 30)) == [DataReceived(b"b" * 30)]
    with pytest.raises(ConnectionStateError):
        conn.consumed(101)


def test_no_credit_update_while_the_guest_still_has_room() -> None:
    conn = established(buf_alloc=100)
    conn.receive(from_guest(Op.RW, payload=b"a" * 10))
    conn.consumed(10)
    assert conn.packets_to_send() == []
    # Our next data packet carries the new fwd_cnt anyway.
    conn.send(b"x")
    [rw] = conn.packets_to_send()
    assert rw.fwd_cnt == 10


def test_credit_requests_are_answered_and_coalesced() -> None:
    conn = established(buf_alloc=100)
    for _ in range(1000):
        conn.receive(from_guest(Op.CREDIT_REQUEST))
    [update] = conn.packets_to_send()
    assert (update.op, update.buf_alloc, update.fwd_cnt) == (Op.CREDIT_UPDATE, 100, 0)
    assert conn.packets_to_send() == []


def test_guest_shutdown_send_then_both_closes_with_rst() -> None:
    conn = established()
    assert conn.receive(from_guest(Op.SHUTDOWN, flags=Shutdown.SEND)) == [
        PeerShutdown(Shutdown.SEND)]
    assert conn.send(b"still fine") == 10  # the guest still receives
    conn.packets_to_send()
    assert conn.receive(from_guest(Op.SHUTDOWN, flags=Shutdown.RCV)) == [
        PeerShutdown(Shutdown.RCV), Closed()]
    assert [p.op for p in conn.packets_to_send()] == [Op.RST]
    assert conn.state == State.CLOSED
    assert conn.receive(from_guest(Op.RW, payload=b"late")) == []


def test_data_after_the_guest_shut_down_sending_resets() -> None:
    conn = established()
    conn.receive(from_guest(Op.SHUTDOWN, flags=Shutdown.SEND))
    [event] = conn.receive(from_guest(Op.RW, payload=b"x"))
    assert isinstance(event, Reset)


def test_send_after_guest_shut_down_receiving_is_refused() -> None:
    conn = established()
    conn.receive(from_guest(Op.SHUTDOWN, flags=Shutdown.RCV))
    with pytest.raises(ConnectionStateError, match="shut down"):
        conn.send(b"x")


def test_host_shutdown_both_waits_for_the_guest_rst() -> None:
    conn = established()
    conn.shutdown(Shutdown.SEND)
    with pytest.raises(ConnectionStateError):
        conn.send(b"x")
    conn.shutdown(Shutdown.RCV)
    shutdowns = conn.packets_to_send()
    assert [(p.op, p.flags) for p in shutdowns] == [(Op.SHUTDOWN, 2), (Op.SHUTDOWN, 1)]
    assert conn.state == State.CLOSING
    assert conn.receive(from_guest(Op.RST)) == [Closed()]
    assert conn.state == State.CLOSED


def test_guest_rst_on_an_open_stream_is_a_reset() -> None:
    conn = established()
    assert conn.receive(from_guest(Op.RST)) == [Reset("the guest reset the stream",
                                                      by_peer=True)]
    assert conn.packets_to_send() == []


def test_local_reset_sends_rst_once() -> None:
    conn = established()
    conn.reset()
    conn.reset()
    assert [p.op for p in conn.packets_to_send()] == [Op.RST]
    with pytest.raises(ConnectionStateError):
        conn.send(b"x")


@pytest.mark.parametrize("op", [Op.REQUEST, Op.RESPONSE])
def test_connect_ops_on_an_open_stream_reset(op: Op) -> None:
    conn = established()
    [event] = conn.receive(from_guest(op))
    assert isinstance(event, Reset) and not event.by_peer


def test_a_misrouted_packet_is_a_local_bug() -> None:
    conn = established()
    with pytest.raises(ConnectionStateError, match="routed"):
        conn.receive(Packet(GUEST_CID, HOST_CID, GUEST_PORT + 1, HOST_PORT, Op.RW))


def test_guest_initiated_accept_and_refuse() -> None:
    request = from_guest(Op.REQUEST, buf_alloc=300)
    conn = Connection.accept(request, buf_alloc=50)
    [response] = conn.packets_to_send()
    assert (response.op, response.dst_port, response.src_port, response.buf_alloc) == \
        (Op.RESPONSE, GUEST_PORT, HOST_PORT, 50)
    assert conn.state == State.ESTABLISHED and conn.peer_free() == 300
    rst = refuse(request)
    assert rst is not None and (rst.op, rst.dst_port) == (Op.RST, GUEST_PORT)
    assert refuse(from_guest(Op.RST)) is None
    with pytest.raises(ConnectionStateError):
        Connection.accept(from_guest(Op.RW))


GUEST_OPS = st.builds(
    lambda op, n, flags, ba, fc: from_guest(op, payload=b"d" * n if op == Op.RW else b"",
                                            flags=flags if op == Op.SHUTDOWN else 0,
                                            buf_alloc=ba, fwd_cnt=fc),
    st.sampled_from(Op), st.integers(0, 80), st.integers(0, 3), st.integers(0, 200),
    st.integers(0, 200))


@settings(max_examples=300)
@given(st.lists(st.one_of(GUEST_OPS, st.integers(0, 50)), max_size=40))
def test_invariants_hold_whatever_the_guest_does(steps: list[Packet | int]) -> None:
    conn = established(buf_alloc=100, peer_buf_alloc=100)
    for step in steps:
        sent, fwd_before = 0, conn.fwd_cnt
        if isinstance(step, int):
            if conn.state == State.ESTABLISHED and not conn.local_shutdown \
                    and not conn.peer_shutdown & Shutdown.RCV:
                free = conn.peer_free()
                sent = conn.send(b"s" * step)
                # Never more than the guest's free space (the spec's peer_free).
                assert sent == min(step, free)
            conn.consumed(min(step, conn.buffered()))
        else:
            conn.receive(step)
        # Our buffer never holds more than we granted.
        assert 0 <= conn.buffered() <= conn.buf_alloc
        packets = conn.packets_to_send()
        assert sum(len(p.payload) for p in packets if p.op == Op.RW) == sent
        for packet in packets:
            assert packet.src_port == HOST_PORT and packet.dst_port == GUEST_PORT
            # Every packet carries our credit as it was when it was queued.
            assert packet.buf_alloc == 100 and fwd_before <= packet.fwd_cnt <= conn.fwd_cnt
