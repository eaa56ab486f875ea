"""The vhost-user-vsock device driven in memory as QEMU and a guest driver would.

Guest memory is a real memfd: the device maps its own copy through the injected mapper (as
the back-end will mmap QEMU's fd), the test's "guest driver" writes rings and packets
through another mapping of the same memfd. Kick/call fds are real eventfds, so fd
ownership is checked by counting /proc/self/fd.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisors.vsock import device as dev
from hypervisors.vsock import packets
from hypervisors.vsock import vhost_user as vu
from hypervisors.vsock.device import RX, TX, Output, VsockDevice
from hypervisors.vsock.errors import CapacityError, VhostUserError, VsockError
from hypervisors.vsock.packets import HEADER_SIZE, HOST_CID, Op, Packet, Shutdown
from hypervisors.vsock.streams import (
    HOST_PORT_FIRST,
    HOST_PORT_LAST,
    MAX_PENDING,
    MAX_STREAMS,
    Data,
    EndOfStream,
    Opened,
    Rejected,
    StreamClosed,
    Writable,
)
from hypervisors.vsock.virtqueue import F_NEXT
from tests.unit.vsock_rig import (
    BASE,
    CID,
    GUEST_PORT,
    QSIZE,
    RINGS,
    RX_BUFS,
    SIZE,
    TX_BUFS,
    USER,
    Guest,
    open_fds,
    to_host,
)

NO_PAYLOAD = vu.NoPayload()


class Maps:
    """The mapper the event loop will inject: mmap, and munmap that fails on stray views."""

    def __init__(self) -> None:
        self.live: list[tuple[memoryview, mmap.mmap]] = []

    def map(self, fd: int, size: int, offset: int) -> memoryview:
        m = mmap.mmap(fd, size, offset=offset)
        view = memoryview(m)
        self.live.append((view, m))
        return view

    def unmap(self, view: memoryview) -> None:
        for i, (v, m) in enumerate(self.live):
            if v is view:
                del self.live[i]
                view.release()
                m.close()  # BufferError if the device kept a view into it
                return
        raise AssertionError("unmapped something never mapped")


class Qemu:
    """The front-end: encodes requests, feeds them through the parser, decodes replies."""

    def __init__(self, device: VsockDevice) -> None:
        self.device = device
        self.parser = vu.Parser()

    def send(self, request: vu.Request, payload: vu.Payload = NO_PAYLOAD,
             fds: tuple[int, ...] = (), *, need_reply: bool = False) -> Output:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        [message] = self.parser.feed(vu.encode_message(request, payload, flags=flags), fds)
        return self.device.handle(message)


def reply_payload(out: Output, request: vu.Request) -> bytes:
    assert out.reply is not None
    code, flags, size = vu.HEADER.unpack_from(out.reply)
    assert (code, flags) == (request, vu.VERSION | vu.FLAG_REPLY)
    body = out.reply[vu.HEADER_SIZE:]
    assert len(body) == size
    return body


def reply_u64(out: Output, request: vu.Request) -> int:
    value: int = struct.unpack("=Q", reply_payload(out, request))[0]
    return value


class Rig:
    """Device + QEMU + guest, through the whole vhost-user start-up."""

    def __init__(self, *, buf_alloc: int = 4096, rx_buf: int = 512) -> None:
        self.maps = Maps()
        self.device = VsockDevice(CID, self.maps.map, self.maps.unmap, buf_alloc=buf_alloc)
        self.qemu = Qemu(self.device)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, SIZE)
        self.guest = Guest(self.memfd, rx_buf)
        self.fds_before = open_fds()
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}

    def start(self) -> None:
        q = self.qemu
        assert reply_u64(q.send(vu.Request.GET_FEATURES), vu.Request.GET_FEATURES) == \
            dev.DEVICE_FEATURES
        protocol = reply_u64(q.send(vu.Request.GET_PROTOCOL_FEATURES),
                             vu.Request.GET_PROTOCOL_FEATURES)
        assert protocol >> vu.PROTOCOL_F_CONFIG & 1 and not protocol >> vu.PROTOCOL_F_MQ & 1
        q.send(vu.Request.SET_PROTOCOL_FEATURES, vu.U64(protocol))
        q.send(vu.Request.SET_OWNER)
        config = q.send(vu.Request.GET_CONFIG, vu.DeviceConfig(0, 0, bytes(8)))
        assert reply_payload(config, vu.Request.GET_CONFIG)[12:] == struct.pack("<Q", CID)
        q.send(vu.Request.SET_FEATURES, vu.U64(dev.DEVICE_FEATURES))
        table = vu.MemoryTable((vu.MemoryRegion(BASE, SIZE, USER, 0),))
        ack = q.send(vu.Request.SET_MEM_TABLE, table, (os.dup(self.memfd),), need_reply=True)
        assert ack.reply == vu.build_ack(vu.Request.SET_MEM_TABLE)
        for index, (desc, avail, used) in RINGS.items():
            q.send(vu.Request.SET_VRING_NUM, vu.VringState(index, QSIZE))
            q.send(vu.Request.SET_VRING_BASE, vu.VringState(index, 0))
            q.send(vu.Request.SET_VRING_ADDR, vu.VringAddr(
                index, 0, USER + desc - BASE, USER + used - BASE, USER + avail - BASE, 0))
            self.kicks[index] = os.eventfd(0)
            self.calls[index] = os.eventfd(0)
            q.send(vu.Request.SET_VRING_KICK, vu.U64(index), (self.kicks[index],))
            q.send(vu.Request.SET_VRING_CALL, vu.U64(index), (self.calls[index],))
            assert not self.device.running(index)  # protocol features: starts disabled
            q.send(vu.Request.SET_VRING_ENABLE, vu.VringState(index, 1))
            assert self.device.running(index)
            assert self.device.kick_fd(index) == self.kicks[index]
            assert self.device.call_fd(index) == self.calls[index]

    def connect(self) -> int:
        """A host client connects to guest port 1024; the guest accepts."""
        port, out = self.device.connect(GUEST_PORT)
        assert RX in out.signal
        [request] = self.guest.receive()
        assert (request.op, request.src_cid, request.dst_cid, request.src_port,
                request.dst_port) == (Op.REQUEST, HOST_CID, CID, port, GUEST_PORT)
        self.guest.send(to_host(Op.RESPONSE, port))
        out = self.device.on_tx_kick()
        assert out.events == [Opened(port)] and TX in out.signal
        return port

    def close(self) -> None:
        self.device.close()
        self.guest.close()
        os.close(self.memfd)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    r.start()
    yield r
    r.close()


def test_handshake_keeps_exactly_the_ring_fds_and_reset_closes_them() -> None:
    r = Rig()
    r.start()
    # SET_MEM_TABLE's fd was closed once mapped (mmap keeps its own); 4 eventfds are kept.
    assert open_fds() == r.fds_before + 4 + 1  # + the mapping's own dup of the memfd
    assert len(r.maps.live) == 1
    out = r.qemu.send(vu.Request.GET_QUEUE_NUM)
    assert reply_u64(out, vu.Request.GET_QUEUE_NUM) == 2
    # Replacing a call fd closes the old one.
    r.qemu.send(vu.Request.SET_VRING_CALL, vu.U64(RX), (os.eventfd(0),))
    assert open_fds() == r.fds_before + 5
    r.qemu.send(vu.Request.SET_VRING_ERR, vu.U64(TX), (os.eventfd(0),))
    assert open_fds() == r.fds_before + 6 and r.device.err_fd(TX) is not None
    r.qemu.send(vu.Request.RESET_OWNER)
    assert open_fds() == r.fds_before and r.maps.live == []
    assert not r.device.running(RX) and r.device.call_fd(RX) is None
    r.close()


def test_get_vring_base_stops_the_ring_and_reports_the_position(rig: Rig) -> None:
    port = rig.connect()
    out = rig.qemu.send(vu.Request.GET_VRING_BASE, vu.VringState(TX, 0))
    assert reply_payload(out, vu.Request.GET_VRING_BASE) == struct.pack("=II", TX, 1)
    assert not rig.device.running(TX) and rig.device.kick_fd(TX) is None
    rig.guest.send(to_host(Op.RW, port, payload=b"late"))
    assert rig.device.on_tx_kick().events == []  # stopped: nothing read
    with pytest.raises(VhostUserError, match="while it runs"):
        rig.qemu.send(vu.Request.SET_VRING_NUM, vu.VringState(RX, QSIZE))
    # Restart from the reported base: the pending packet is read now.
    rig.qemu.send(vu.Request.SET_VRING_BASE, vu.VringState(TX, 1))
    rig.qemu.send(vu.Request.SET_VRING_KICK, vu.U64(TX | vu.VRING_NOFD_MASK))
    assert rig.device.on_tx_kick().events == [Data(port, b"late")]


def test_config_window_outside_the_cid_gets_an_empty_answer(rig: Rig) -> None:
    out = rig.qemu.send(vu.Request.GET_CONFIG, vu.DeviceConfig(4, 0, bytes(8)))
    assert reply_payload(out, vu.Request.GET_CONFIG) == struct.pack("=III", 4, 0, 0)
    out = rig.qemu.send(vu.Request.GET_CONFIG, vu.DeviceConfig(0, 0, bytes(4)))
    assert reply_payload(out, vu.Request.GET_CONFIG)[12:] == struct.pack("<I", CID)


@pytest.mark.parametrize("steps, error", [
    ([(vu.Request.SET_VRING_ADDR, vu.VringAddr(0, 0, USER, USER, USER, 0))], "SET_OWNER"),
    ([(vu.Request.SET_OWNER, vu.NoPayload()),
      (vu.Request.SET_VRING_ADDR, vu.VringAddr(0, 0, USER, USER, USER, 0))], "SET_MEM_TABLE"),
    ([(vu.Request.SET_OWNER, vu.NoPayload()),
      (vu.Request.SET_VRING_NUM, vu.VringState(2, 8))], "2 queues"),
    ([(vu.Request.SET_OWNER, vu.NoPayload()),
      (vu.Request.SET_VRING_NUM, vu.VringState(0, 6))], "power of 2"),
    ([(vu.Request.SET_FEATURES, vu.U64(1 << 29))], "not offered"),
    ([(vu.Request.SET_PROTOCOL_FEATURES, vu.U64(1 << vu.PROTOCOL_F_MQ))], "not offered"),
    ([(vu.Request.SET_CONFIG, vu.DeviceConfig(0, 0, bytes(8)))], "read-only"),
])
def test_out_of_order_or_invalid_messages_are_protocol_errors(
        steps: list[tuple[vu.Request, vu.Payload]], error: str) -> None:
    device = VsockDevice(CID, Maps().map)
    qemu = Qemu(device)
    *setup, (request, payload) = steps
    for req, pay in setup:
        qemu.send(req, pay)
    with pytest.raises(VhostUserError, match=error):
        qemu.send(request, payload)


def test_refused_messages_close_their_fds() -> None:
    r = Rig()
    r.qemu.send(vu.Request.SET_OWNER)
    # A kick for vring 5, and a kick before the ring has addresses.
    for index in (5, 0):
        r.qemu.parser = vu.Parser()
        with pytest.raises(VhostUserError):
            r.qemu.send(vu.Request.SET_VRING_KICK, vu.U64(index), (os.eventfd(0),))
    # A memory table the mapper cannot map (the region is larger than the memfd).
    r.qemu.parser = vu.Parser()
    table = vu.MemoryTable((vu.MemoryRegion(BASE, SIZE * 4, USER, 0),))
    with pytest.raises(VhostUserError, match="cannot map"):
        r.qemu.send(vu.Request.SET_MEM_TABLE, table, (os.dup(r.memfd),))
    assert open_fds() == r.fds_before and r.maps.live == []
    r.close()


def test_a_new_memory_table_rebuilds_running_rings_and_unmaps_the_old_one(rig: Rig) -> None:
    port = rig.connect()
    table = vu.MemoryTable((vu.MemoryRegion(BASE, SIZE, USER, 0),))
    old = rig.maps.live[0][1]
    rig.qemu.send(vu.Request.SET_MEM_TABLE, table, (os.dup(rig.memfd),))
    assert old.closed and len(rig.maps.live) == 1
    rig.guest.send(to_host(Op.RW, port, payload=b"after hotplug"))
    assert rig.device.on_tx_kick().events == [Data(port, b"after hotplug")]


def test_data_both_ways_with_guest_port_1024(rig: Rig) -> None:
    port = rig.connect()
    assert port == HOST_PORT_FIRST
    taken, out = rig.device.write(port, b"hello guest")
    assert taken == 11 and RX in out.signal
    [rw] = rig.guest.receive()
    assert (rw.op, rw.payload, rw.src_port, rw.dst_port) == (Op.RW, b"hello guest", port,
                                                             GUEST_PORT)
    rig.guest.send(to_host(Op.RW, port, payload=b"hello host"))
    assert rig.device.on_tx_kick().events == [Data(port, b"hello host")]
    rig.device.consumed(port, 10)
    assert rig.guest.receive() == []  # plenty of credit left: no CREDIT_UPDATE yet


def test_rw_packets_are_cut_to_the_guests_rx_buffers(rig: Rig) -> None:
    port = rig.connect()
    data = bytes(range(256)) * 4
    rig.device.write(port, data)
    got = rig.guest.receive()
    assert [len(p.payload) for p in got] == [468, 468, 88]
    assert b"".join(p.payload for p in got) == data


def test_credit_exhaustion_waits_for_the_guests_credit_update(rig: Rig) -> None:
    port, _ = rig.device.connect(GUEST_PORT)
    rig.guest.receive()
    rig.guest.send(to_host(Op.RESPONSE, port, buf_alloc=100))
    rig.device.on_tx_kick()
    taken, _ = rig.device.write(port, b"x" * 300)
    assert taken == 300  # buffered within MAX_PENDING, sent as credit allows
    got = rig.guest.receive()
    assert [(p.op, len(p.payload)) for p in got] == [(Op.RW, 100), (Op.CREDIT_REQUEST, 0)]
    rig.guest.send(to_host(Op.CREDIT_UPDATE, port, buf_alloc=100, fwd_cnt=100))
    rig.device.on_tx_kick()
    got = rig.guest.receive()
    assert [(p.op, len(p.payload)) for p in got] == [(Op.RW, 100), (Op.CREDIT_REQUEST, 0)]
    rig.guest.send(to_host(Op.CREDIT_UPDATE, port, buf_alloc=100, fwd_cnt=200))
    rig.device.on_tx_kick()
    assert [len(p.payload) for p in rig.guest.receive()] == [100]


def test_host_grants_credit_back_once_the_client_consumed(rig: Rig) -> None:
    port = rig.connect()  # the device grants buf_alloc=4096
    rig.guest.send(to_host(Op.RW, port, payload=b"a" * 4096))
    assert rig.device.on_tx_kick().events == [Data(port, b"a" * 4096)]
    rig.guest.send(to_host(Op.RW, port, payload=b"b"))  # beyond the credit: reset
    out = rig.device.on_tx_kick()
    assert out.events == [StreamClosed(port, True, "1 bytes sent with only 0 bytes of credit")]
    assert [p.op for p in rig.guest.receive()] == [Op.RST]
    port = rig.connect()
    rig.guest.send(to_host(Op.RW, port, payload=b"a" * 4096))
    rig.device.on_tx_kick()
    rig.device.consumed(port, 4096)
    [update] = rig.guest.receive()
    assert (update.op, update.buf_alloc, update.fwd_cnt) == (Op.CREDIT_UPDATE, 4096, 4096)


def test_a_guest_that_never_reads_makes_host_writes_wait() -> None:
    r = Rig(rx_buf=4096)
    r.start()
    port = r.connect()
    r.guest.send(to_host(Op.CREDIT_UPDATE, port, buf_alloc=1 << 30))
    r.device.on_tx_kick()
    chunk = b"z" * 65536
    total = 0
    for _ in range(2 * MAX_PENDING // len(chunk)):  # bounded: an unbounded device must fail
        total += r.device.write(port, chunk)[0]
    assert total == MAX_PENDING + 8 * (4096 - HEADER_SIZE)  # the bound + what rx holds
    assert r.device.write(port, chunk)[0] == 0
    assert r.device.streams.room(port) == 0
    got = r.guest.receive()  # the guest reads 8 buffers and gives them back
    assert len(got) == 8
    out = r.device.on_rx_kick()
    assert out.events == [Writable(port)] and RX in out.signal
    assert r.device.write(port, chunk)[0] == 8 * (4096 - HEADER_SIZE)
    r.close()


def test_shutdown_from_both_sides_then_rst_releases_the_port(rig: Rig) -> None:
    port = rig.connect()
    rig.guest.send(to_host(Op.SHUTDOWN, port, flags=Shutdown.SEND))
    assert rig.device.on_tx_kick().events == [EndOfStream(port)]
    rig.device.write(port, b"last words")
    rig.device.close_stream(port)
    got = rig.guest.receive()
    assert [(p.op, p.flags) for p in got] == [(Op.RW, 0), (Op.SHUTDOWN, 3)]
    rig.guest.send(to_host(Op.RST, port))
    assert rig.device.on_tx_kick().events == [StreamClosed(port, False)]
    assert rig.device.streams.ports() == ()
    with pytest.raises(VsockError, match="no vsock stream"):
        rig.device.write(port, b"x")


def test_guest_full_shutdown_is_answered_with_rst(rig: Rig) -> None:
    port = rig.connect()
    rig.guest.send(to_host(Op.SHUTDOWN, port, flags=Shutdown.BOTH))
    out = rig.device.on_tx_kick()
    assert out.events == [EndOfStream(port), StreamClosed(port, False)]
    assert [p.op for p in rig.guest.receive()] == [Op.RST]


def test_close_write_sends_shutdown_after_pending_data(rig: Rig) -> None:
    port, _ = rig.device.connect(GUEST_PORT)
    rig.guest.receive()
    rig.guest.send(to_host(Op.RESPONSE, port, buf_alloc=10))
    rig.device.on_tx_kick()
    rig.device.write(port, b"0123456789abc")
    rig.device.close_write(port)
    assert [p.op for p in rig.guest.receive()] == [Op.RW, Op.CREDIT_REQUEST]
    rig.guest.send(to_host(Op.CREDIT_UPDATE, port, buf_alloc=10, fwd_cnt=10))
    rig.device.on_tx_kick()
    got = rig.guest.receive()
    assert [(p.op, p.payload, p.flags) for p in got] == [(Op.RW, b"abc", 0),
                                                          (Op.SHUTDOWN, b"", 2)]


def test_rst_and_refusal(rig: Rig) -> None:
    port, _ = rig.device.connect(4000)
    rig.guest.receive()
    rig.guest.send(to_host(Op.RST, port, src_port=4000))
    assert rig.device.on_tx_kick().events == [Rejected(port)]
    port = rig.connect()
    rig.guest.send(to_host(Op.RST, port))
    out = rig.device.on_tx_kick()
    assert out.events == [StreamClosed(port, True, "the guest reset the stream")]
    assert rig.guest.receive() == []  # never an RST to an RST


def test_stray_and_spoofed_guest_packets(rig: Rig) -> None:
    port = rig.connect()
    rig.guest.send(to_host(Op.REQUEST, 80, src_port=5000))  # guest-initiated: nobody listens
    rig.guest.send(to_host(Op.RW, port, payload=b"x", src_port=1025))  # wrong guest port
    spoofed = Packet(CID + 1, HOST_CID, GUEST_PORT, port, Op.RW, payload=b"spoof")
    rig.guest.send(spoofed)
    assert rig.device.on_tx_kick().events == []
    got = rig.guest.receive()
    assert [(p.op, p.src_port, p.dst_port) for p in got] == [(Op.RST, 80, 5000),
                                                             (Op.RST, port, 1025)]
    assert rig.device.streams.dropped == 1


def test_malformed_packet_resets_only_its_stream(rig: Rig) -> None:
    port = rig.connect()
    bad = bytearray(packets.build(to_host(Op.RW, port, payload=b"abc")))
    bad[24:28] = struct.pack("<I", 99)  # len says 99, 3 bytes came
    rig.guest.send(bytes(bad))
    out = rig.device.on_tx_kick()
    [closed] = out.events
    assert isinstance(closed, StreamClosed) and closed.reset and "len 99" in closed.reason
    assert [p.op for p in rig.guest.receive()] == [Op.RST]
    assert rig.device.failure is None
    rig.guest.send(b"short")  # no header: dropped
    assert rig.device.on_tx_kick().events == []
    assert rig.connect() != port  # the device still works


def test_malformed_chain_fails_the_device_until_reset(rig: Rig) -> None:
    port = rig.connect()
    rig.guest.desc(TX, 0, TX_BUFS, 16, F_NEXT, 1)
    rig.guest.desc(TX, 1, TX_BUFS, 16, F_NEXT, 0)  # a loop
    rig.guest.offer(TX, 0)
    out = rig.device.on_tx_kick()
    assert out.failure is not None and "twice" in out.failure
    assert out.events == [StreamClosed(port, True, f"device failed: {out.failure}")]
    assert not rig.device.running(TX) and not rig.device.running(RX)
    with pytest.raises(VhostUserError, match="device failed"):
        rig.device.connect(GUEST_PORT)
    rig.qemu.send(vu.Request.RESET_DEVICE)
    assert open_fds() == rig.fds_before and rig.maps.live == []
    assert rig.device.failure is None


def test_tiny_rx_buffer_fails_the_device() -> None:
    r = Rig(rx_buf=HEADER_SIZE)
    r.start()
    _, out = r.device.connect(GUEST_PORT)
    assert out.failure is not None and "less than" in out.failure
    assert out.events and isinstance(out.events[0], StreamClosed)
    r.close()


def test_host_ports_never_collide_and_are_released(rig: Rig) -> None:
    streams = rig.device.streams
    ports = [rig.device.connect(GUEST_PORT)[0] for _ in range(MAX_STREAMS)]
    assert len(set(ports)) == MAX_STREAMS and min(ports) == HOST_PORT_FIRST
    with pytest.raises(CapacityError):
        rig.device.connect(GUEST_PORT)
    rig.device.reset_stream(ports[0])
    streams._next_port = HOST_PORT_LAST  # wrap: the next free ones after the top
    assert rig.device.connect(GUEST_PORT)[0] == HOST_PORT_LAST
    streams.reset(ports[5])
    assert rig.device.connect(GUEST_PORT)[0] == HOST_PORT_FIRST  # freed, after the wrap
    assert len(streams) == MAX_STREAMS


# -- properties ---------------------------------------------------------------------------

_index = st.integers(0, 3)
_payloads: dict[vu.Request, st.SearchStrategy[vu.Payload]] = {
    vu.Request.SET_FEATURES: st.sampled_from([dev.DEVICE_FEATURES, 1 << 32, 1 << 26]).map(vu.U64),
    vu.Request.SET_PROTOCOL_FEATURES: st.integers(0, 1 << 14).map(vu.U64),
    vu.Request.SET_VRING_NUM: st.builds(vu.VringState, _index, st.sampled_from([0, 1, 8, 6])),
    vu.Request.SET_VRING_BASE: st.builds(vu.VringState, _index, st.integers(0, 1 << 17)),
    vu.Request.GET_VRING_BASE: st.builds(vu.VringState, _index, st.just(0)),
    vu.Request.SET_VRING_ENABLE: st.builds(vu.VringState, _index, st.integers(0, 2)),
    vu.Request.SET_VRING_ADDR: st.builds(
        vu.VringAddr, _index, st.integers(0, 1), *[st.integers(USER, USER + SIZE)] * 3,
        st.just(0)),
    vu.Request.SET_VRING_KICK: st.integers(0, 0x1FF).map(vu.U64),
    vu.Request.SET_VRING_CALL: st.integers(0, 0x1FF).map(vu.U64),
    vu.Request.SET_VRING_ERR: st.integers(0, 0x1FF).map(vu.U64),
    vu.Request.SET_MEM_TABLE: st.builds(
        lambda n, g, u: vu.MemoryTable(tuple(vu.MemoryRegion(g + i * SIZE, SIZE, u + i * SIZE,
                                                             0) for i in range(n))),
        st.integers(1, 2), st.sampled_from([0, BASE]), st.sampled_from([USER, 0x1000])),
    vu.Request.GET_CONFIG: st.builds(vu.DeviceConfig, st.integers(0, 12), st.just(0),
                                     st.binary(max_size=12)),
}


def _tagged(request: vu.Request, payloads: st.SearchStrategy[vu.Payload],
            ) -> st.SearchStrategy[tuple[vu.Request, vu.Payload]]:
    return st.tuples(st.just(request), payloads)


_messages = st.one_of(
    st.sampled_from([r for r in vu.Request if r not in _payloads]).map(
        lambda r: (r, NO_PAYLOAD)),
    *[_tagged(r, s) for r, s in _payloads.items()])
_host_calls = st.sampled_from(["tx", "rx", "connect", "write", "close"])


def _prelude() -> list[tuple[vu.Request, vu.Payload]]:
    """A valid start-up (no eventfds: polling), so that random steps reach the data path."""
    steps: list[tuple[vu.Request, vu.Payload]] = [
        (vu.Request.SET_OWNER, vu.NoPayload()),
        (vu.Request.SET_MEM_TABLE, vu.MemoryTable((vu.MemoryRegion(BASE, SIZE, USER, 0),)))]
    for index, (desc, avail, used) in RINGS.items():
        steps += [(vu.Request.SET_VRING_NUM, vu.VringState(index, QSIZE)),
                  (vu.Request.SET_VRING_ADDR, vu.VringAddr(index, 0, USER + desc - BASE,
                                                           USER + used - BASE,
                                                           USER + avail - BASE, 0)),
                  (vu.Request.SET_VRING_KICK, vu.U64(index | vu.VRING_NOFD_MASK))]
    return steps


_descs = st.lists(st.tuples(st.one_of(st.sampled_from([RX_BUFS, TX_BUFS, BASE + SIZE - 8]),
                                      st.integers(0, (1 << 64) - 1)),
                            st.integers(0, 300), st.sampled_from([0, 0, 1, 2, 3, 4]),
                            st.integers(0, 9)),
                  min_size=QSIZE // 2, max_size=QSIZE)
_avail = st.tuples(st.integers(0, 10), st.lists(st.integers(0, 9), max_size=QSIZE))


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(prelude=st.booleans(),
       steps=st.lists(st.integers(0, 2).flatmap(lambda m: _host_calls if m else _messages),
                      max_size=30),
       rings=st.tuples(_descs, _avail, _descs, _avail), fill=st.binary(max_size=64))
def test_arbitrary_message_sequences_raise_only_vsock_errors_and_leak_no_fd(
        prelude: bool, steps: list[tuple[vu.Request, vu.Payload] | str],
        rings: tuple[list[tuple[int, int, int, int]], tuple[int, list[int]],
                     list[tuple[int, int, int, int]], tuple[int, list[int]]],
        fill: bytes) -> None:
    # Guest memory: arbitrary descriptor tables and available rings, buffers of `fill`.
    memory = bytearray((fill or b"\0") * (SIZE // max(1, len(fill)) + 1))[:SIZE]
    for q, descs, (idx, heads) in ((RX, rings[0], rings[1]), (TX, rings[2], rings[3])):
        desc, avail, _ = (a - BASE for a in RINGS[q])
        for i, d in enumerate(descs):
            struct.pack_into("<QIHH", memory, desc + 16 * i, *d)
        struct.pack_into(f"<HH{len(heads)}H", memory, avail, 0, idx, *heads)

    def mapper(fd: int, size: int, offset: int) -> memoryview:
        return memoryview(memory)[:size] if size <= SIZE else memoryview(bytearray(size))

    before = open_fds()
    device = VsockDevice(CID, mapper)
    ports: list[int] = []
    for step in [*(_prelude() if prelude else []), *steps]:
        try:
            if isinstance(step, str):
                _host_call(device, step, ports)
                continue
            request, payload = step
            fds = tuple(os.eventfd(0) for _ in range(vu.expected_fds(request, payload)))
            [message] = vu.Parser().feed(vu.encode_message(request, payload), fds)
            device.handle(message)
        except VsockError:
            pass
    device.close()
    assert open_fds() == before


def _host_call(device: VsockDevice, call: str, ports: list[int]) -> None:
    if call == "tx":
        device.on_tx_kick()
    elif call == "rx":
        device.on_rx_kick()
    elif call == "connect":
        ports.append(device.connect(GUEST_PORT)[0])
    elif ports and call == "write":
        device.write(ports[-1], b"data" * 100)
    elif ports:
        device.close_stream(ports.pop())


@settings(max_examples=100, deadline=None, derandomize=True)
@given(frames=st.lists(st.binary(max_size=120), min_size=1, max_size=6),
       header=st.builds(Packet, st.just(CID), st.just(HOST_CID), st.just(GUEST_PORT),
                        st.just(HOST_PORT_FIRST), st.sampled_from(list(Op)),
                        flags=st.integers(0, 3), buf_alloc=st.integers(0, (1 << 32) - 1),
                        fwd_cnt=st.integers(0, (1 << 32) - 1)))
def test_arbitrary_guest_packets_never_raise(frames: list[bytes], header: Packet) -> None:
    r = Rig()
    r.start()
    try:
        port = r.connect()
        assert port == HOST_PORT_FIRST
        for frame in frames:
            # Half the frames start with a valid-looking header for the open stream.
            data = packets.build(header)[:HEADER_SIZE] + frame if frame[:1] == b"\0" else frame
            r.guest.send(data or b"\0")
            out = r.device.on_tx_kick()
            assert out.failure is None
            r.guest.receive()
            if port in r.device.streams.ports():
                r.device.write(port, b"payload")
    finally:
        r.close()
