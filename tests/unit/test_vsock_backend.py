"""The vhost-user-vsock back-end (`backend.Backend`, `clients.HostClients`) end to end,
in one process and one event loop, with no VM.

The test plays QEMU on the back-end's vhost-user socket (real messages, fds in SCM_RIGHTS:
a memfd as guest RAM, eventfds for kicks and calls), plays the guest's virtio-vsock driver
on that memfd (`vsock_rig.Guest`), and plays hybrid-vsock clients on the other socket.
Every scenario ends with "QEMU" leaving, `run()` returning, and no fd, mapping or client
socket left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisors.vsock import clients
from hypervisors.vsock import device as dev
from hypervisors.vsock import vhost_user as vu
from hypervisors.vsock.backend import Backend, Mappings
from hypervisors.vsock.connections import DEFAULT_BUF_ALLOC
from hypervisors.vsock.device import RX, TX
from hypervisors.vsock.packets import HEADER_SIZE, HOST_CID, Op, Packet, Shutdown
from hypervisors.vsock.process import listen_unix
from hypervisors.vsock.streams import HOST_PORT_FIRST, MAX_PENDING
from tests.unit.vsock_rig import (
    BASE,
    CID,
    GUEST_PORT,
    QSIZE,
    RINGS,
    SIZE,
    TX_BUF,
    USER,
    Guest,
    open_fds,
    to_host,
)

MEMFD_NAME = "vsb-guest-ram"
TIMEOUT = 5.0  # per wait: generous, a wait that ends at all ends within milliseconds
NO_PAYLOAD = vu.NoPayload()
#: The largest RW payload one of the rig's tx buffers carries.
TX_CHUNK = TX_BUF - HEADER_SIZE


def guest_ram_mapped() -> bool:
    """Whether any mapping of a rig memfd is left in this process."""
    with open("/proc/self/maps") as maps:
        return MEMFD_NAME in maps.read()


async def readable(fd: int) -> None:
    """Until ``fd`` is readable (bounded by `TIMEOUT`)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def fire() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, fire)
    try:
        await asyncio.wait_for(ready, TIMEOUT)
    finally:
        loop.remove_reader(fd)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def recv_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < count:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, count - len(data)), TIMEOUT)
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return data


async def recv_to_eof(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """What ``sock`` receives until the back-end closes it (a close with our bytes still
    unread is a reset on AF_UNIX too: ECONNRESET counts as the end)."""
    loop = asyncio.get_running_loop()
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout):
            data += chunk
    return data


class FakeQemu:
    """The vhost-user front-end: encoded requests, fds by SCM_RIGHTS, replies checked."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def send(self, request: vu.Request, payload: vu.Payload = NO_PAYLOAD,
                   fds: tuple[int, ...] = (), *, ack: bool = False) -> bytes | None:
        """Send one request (``ack``: with NEED_REPLY); its reply payload, if it has one."""
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if ack else 0)
        self.send_raw(vu.encode_message(request, payload, flags=flags), fds)
        if request in vu.ALWAYS_REPLY or ack:
            return await self.reply(request)
        return None

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        # Our copies of the fds stay ours: the back-end gets its own.
        assert socket.send_fds(self.sock, [data], list(fds)) == len(data)

    async def reply(self, request: vu.Request) -> bytes:
        code, flags, size = vu.HEADER.unpack(await recv_exactly(self.sock, vu.HEADER_SIZE))
        assert (code, flags) == (request, vu.VERSION | vu.FLAG_REPLY)
        return await recv_exactly(self.sock, size)

    async def u64(self, request: vu.Request, payload: vu.Payload = NO_PAYLOAD) -> int:
        body = await self.send(request, payload)
        assert body is not None
        value: int = struct.unpack("=Q", body)[0]
        return value


class Rig:
    """A `Backend` on two listening sockets, QEMU, the guest, and hybrid clients."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.fds_before = open_fds()
        self.dir = Path(tempfile.mkdtemp(prefix="vsb-", dir="/tmp"))  # AF_UNIX: 108 bytes
        self.hybrid_path = self.dir / "vsock.sock"
        vhost = listen_unix(self.dir / "vhost-vsock.sock")
        hybrid = listen_unix(self.hybrid_path)
        self.backend = Backend(CID)
        self.run: asyncio.Task[int] = asyncio.ensure_future(self.backend.run(vhost, hybrid))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect(str(self.dir / "vhost-vsock.sock"))  # the back-end listens: no wait
        self.qemu = FakeQemu(sock)
        self.memfd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, SIZE)
        self.guest = Guest(self.memfd, rx_buf=4096)
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.clients: list[socket.socket] = []
        self.fds: list[int] = []  # more fds of ours, closed at the end

    async def start(self) -> None:
        """QEMU's start-up sequence, as vhost-user-vsock-pci sends it."""
        q = self.qemu
        assert await q.u64(vu.Request.GET_FEATURES) == dev.DEVICE_FEATURES
        protocol = await q.u64(vu.Request.GET_PROTOCOL_FEATURES)
        assert protocol == dev.PROTOCOL_FEATURES
        await q.send(vu.Request.SET_PROTOCOL_FEATURES, vu.U64(protocol))
        await q.send(vu.Request.SET_OWNER, ack=True)
        config = await q.send(vu.Request.GET_CONFIG, vu.DeviceConfig(0, 0, bytes(8)))
        assert config == struct.pack("=III", 0, 8, 0) + struct.pack("<Q", CID)
        await q.send(vu.Request.SET_FEATURES, vu.U64(dev.DEVICE_FEATURES), ack=True)
        table = vu.MemoryTable((vu.MemoryRegion(BASE, SIZE, USER, 0),))
        assert await q.send(vu.Request.SET_MEM_TABLE, table, (self.memfd,), ack=True) == \
            struct.pack("=Q", 0)
        for index, (desc, avail, used) in RINGS.items():
            await q.send(vu.Request.SET_VRING_NUM, vu.VringState(index, QSIZE), ack=True)
            await q.send(vu.Request.SET_VRING_BASE, vu.VringState(index, 0), ack=True)
            await q.send(vu.Request.SET_VRING_ADDR, vu.VringAddr(
                index, 0, USER + desc - BASE, USER + used - BASE, USER + avail - BASE, 0),
                ack=True)
            self.kicks[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.calls[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            await q.send(vu.Request.SET_VRING_KICK, vu.U64(index), (self.kicks[index],),
                         ack=True)
            await q.send(vu.Request.SET_VRING_CALL, vu.U64(index), (self.calls[index],),
                         ack=True)
        for index in RINGS:
            await q.send(vu.Request.SET_VRING_ENABLE, vu.VringState(index, 1), ack=True)
            assert self.backend.device.running(index)

    # -- the guest ----------------------------------------------------------------------

    async def interrupt(self, queue: int) -> None:
        """Until the back-end signals ``queue``'s call eventfd (then clear it)."""
        await readable(self.calls[queue])
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.calls[queue])

    async def packets(self, count: int) -> list[Packet]:
        """The next ``count`` packets in the guest's rx ring, waiting for interrupts."""
        got = self.guest.receive()
        while len(got) < count:
            await self.interrupt(RX)
            got += self.guest.receive()
        assert len(got) == count, got
        return got

    async def some_packets(self) -> list[Packet]:
        """Every packet in the guest's rx ring, once there is at least one."""
        got = self.guest.receive()
        while not got:
            await self.interrupt(RX)
            got = self.guest.receive()
        return got

    async def send(self, *sent: Packet) -> None:
        """The guest sends packets and kicks tx; returns once the device used them all
        (it handles a kick in one go, so their effects are done too)."""
        for packet in sent:
            self.guest.send(packet)
        os.eventfd_write(self.kicks[TX], 1)
        while self.guest.used_idx(TX) != self.guest.avail[TX]:
            await self.interrupt(TX)

    # -- hybrid clients -----------------------------------------------------------------

    async def client(self, hello: bytes = b"") -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        self.clients.append(sock)
        await self.loop.sock_connect(sock, str(self.hybrid_path))
        if hello:
            await self.loop.sock_sendall(sock, hello)
        return sock

    async def open_stream(self, hello: bytes = b"CONNECT 1024\n") -> tuple[socket.socket, int]:
        """A client connects to guest port 1024 and the guest accepts: (client, host port)."""
        sock = await self.client(hello)
        [request] = await self.packets(1)
        port = request.src_port
        assert (request.op, request.src_cid, request.dst_cid, request.dst_port) == (
            Op.REQUEST, HOST_CID, CID, GUEST_PORT)
        await self.send(to_host(Op.RESPONSE, port))
        assert await recv_exactly(sock, len(b"OK %d\n" % port)) == b"OK %d\n" % port
        return sock, port

    # -- the end ------------------------------------------------------------------------

    async def finish(self, code: int = 0) -> None:
        """QEMU leaves: `run` returns ``code`` and nothing is left behind."""
        self.qemu.sock.close()
        assert await asyncio.wait_for(self.run, TIMEOUT) == code
        self.assert_released()

    def assert_released(self) -> None:
        assert self.backend._mappings._maps == {}
        for sock in self.clients:
            sock.close()
        for fd in (*self.kicks.values(), *self.calls.values(), *self.fds, self.memfd):
            os.close(fd)
        self.guest.close()
        assert not guest_ram_mapped()  # the back-end unmapped its view of guest RAM
        shutil.rmtree(self.dir)
        assert open_fds() == self.fds_before

    def abandon(self) -> None:
        """After a failed test: release what we can, quietly."""
        self.run.cancel()
        with contextlib.suppress(Exception):
            self.backend.close()
        self.qemu.sock.close()
        for sock in self.clients:
            sock.close()
        for fd in (*self.kicks.values(), *self.calls.values(), *self.fds, self.memfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(Exception):
            self.guest.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def scenario(body: Callable[[Rig], Awaitable[None]]) -> None:
    """Run ``body`` on a started rig in a fresh event loop."""

    async def main() -> None:
        rig = Rig()
        try:
            await rig.start()
            await body(rig)
        except BaseException:
            rig.abandon()
            raise

    run(main())


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


# -- Mappings ---------------------------------------------------------------------------


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 * mmap.PAGESIZE)
    os.pwrite(fd, bytes(range(256)) * (4 * mmap.PAGESIZE // 256), 0)
    yield fd
    os.close(fd)
    assert not guest_ram_mapped()


@pytest.mark.parametrize("offset", [0, 100, mmap.PAGESIZE, mmap.PAGESIZE + 4000])
def test_mappings_map_any_offset_shared_and_writable(memfd: int, offset: int) -> None:
    maps = Mappings()
    view = maps.map(memfd, 5000, offset)
    assert len(view) == 5000 and not view.readonly
    assert bytes(view[:4]) == os.pread(memfd, 4, offset)
    view[10:13] = b"xyz"  # shared: the memfd (QEMU's guest RAM) sees our writes
    assert os.pread(memfd, 3, offset + 10) == b"xyz"
    maps.unmap(view)
    assert not guest_ram_mapped()


def test_mappings_close_unmaps_everything_and_a_held_view_only_delays_it(
        memfd: int, caplog: pytest.LogCaptureFixture) -> None:
    maps = Mappings()
    maps.map(memfd, 100, 0)
    held = maps.map(memfd, 100, 200)
    inner = held[10:20]  # a view into the mapping still alive at unmap time
    with caplog.at_level(logging.WARNING, "vsock-backend"):
        maps.close()
    assert "still in use" in caplog.text
    assert maps._maps == {}
    assert guest_ram_mapped() and bytes(inner[:2]) == bytes([210, 211])
    inner.release()  # the last view gone: the mapping goes
    assert not guest_ram_mapped()


# -- the whole back-end -----------------------------------------------------------------


def test_end_to_end_connect_data_both_ways_close_and_qemu_leaves() -> None:
    async def body(rig: Rig) -> None:
        # Stream bytes may follow the CONNECT line in the same write.
        client, port = await rig.open_stream(b"CONNECT 1024\nearly")
        assert port == HOST_PORT_FIRST
        [early] = await rig.packets(1)
        assert (early.op, early.payload, early.src_port, early.dst_port, early.dst_cid) == (
            Op.RW, b"early", port, GUEST_PORT, CID)
        await rig.loop.sock_sendall(client, b"hello guest")
        [rw] = await rig.packets(1)
        assert (rw.op, rw.payload) == (Op.RW, b"hello guest")
        await rig.send(to_host(Op.RW, port, payload=b"hello host"))
        assert await recv_exactly(client, 10) == b"hello host"
        # The client ends: the guest hears SHUTDOWN(SEND), closes its side, gets the RST.
        client.close()
        [shutdown] = await rig.packets(1)
        assert (shutdown.op, shutdown.flags) == (Op.SHUTDOWN, Shutdown.SEND)
        await rig.send(to_host(Op.SHUTDOWN, port, flags=Shutdown.BOTH))
        [rst] = await rig.packets(1)
        assert rst.op == Op.RST and rst.src_port == port
        assert rig.backend.device.streams.ports() == ()
        assert rig.backend._clients._streams == {}
        await rig.finish(0)

    scenario(body)


def test_only_the_first_vhost_user_connection_drives_the_device() -> None:
    async def body(rig: Rig) -> None:
        # The listener went with QEMU's accept: nobody else may drive the device.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as intruder, \
                pytest.raises(ConnectionRefusedError):
            intruder.connect(str(rig.dir / "vhost-vsock.sock"))
        await rig.finish(0)

    scenario(body)


def test_a_graceful_close_delivers_everything_to_a_slow_client() -> None:
    async def body(rig: Rig) -> None:
        client, port = await rig.open_stream()
        rig.backend._clients._streams[port].sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(i % 253 for i in range(8 * TX_CHUNK))
        for start in range(0, len(data), TX_CHUNK):
            await rig.send(to_host(Op.RW, port, payload=data[start:start + TX_CHUNK]))
        await rig.send(to_host(Op.SHUTDOWN, port, flags=Shutdown.BOTH))  # a later kick
        got = await recv_to_eof(client, 0.5)
        assert len(got) == len(data) and got == data
        await rig.finish(0)

    scenario(body)


def test_a_guest_that_ends_the_stream_gives_the_client_eof_after_its_data() -> None:
    async def body(rig: Rig) -> None:
        client, port = await rig.open_stream()
        # A guest that writes its last bytes and closes at once: one kick carries both.
        await rig.send(to_host(Op.RW, port, payload=b"last words"),
                       to_host(Op.SHUTDOWN, port, flags=Shutdown.BOTH))
        assert await recv_to_eof(client, 0.5) == b"last words"
        [rst] = await rig.packets(1)
        assert rst.op == Op.RST
        await rig.finish(0)

    scenario(body)


@pytest.mark.parametrize("message, fds", [
    (vu.HEADER.pack(99, vu.VERSION, 0), 0),  # no such request
    (vu.encode_message(vu.Request.SET_CONFIG, vu.DeviceConfig(0, 0, bytes(8))), 0),  # refused
    (vu.encode_message(vu.Request.SET_VRING_CALL, vu.U64(0)), 1),  # before SET_OWNER
    (vu.encode_message(vu.Request.GET_FEATURES, NO_PAYLOAD), vu.MAX_REGIONS + 1),  # MSG_CTRUNC
])
def test_a_malformed_or_refused_message_ends_run_with_1_and_closes_its_fds(
        message: bytes, fds: int) -> None:
    async def main() -> None:
        rig = Rig()
        try:
            extra = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(fds))
            rig.qemu.send_raw(message, extra)
            for fd in extra:
                os.close(fd)
            assert await asyncio.wait_for(rig.run, TIMEOUT) == 1
            rig.qemu.sock.close()
            rig.assert_released()
        except BaseException:
            rig.abandon()
            raise

    run(main())


def test_qemu_leaving_mid_stream_drops_the_clients() -> None:
    async def body(rig: Rig) -> None:
        client, _ = await rig.open_stream()
        waiting = await rig.client()  # still in its handshake
        await until(lambda: len(rig.backend._clients._handshaking) == 1, "the accept")
        rig.qemu.sock.close()
        assert await asyncio.wait_for(rig.run, TIMEOUT) == 0
        assert await recv_to_eof(client) == b""
        assert await recv_to_eof(waiting) == b""
        rig.assert_released()

    scenario(body)


def test_a_port_the_guest_refuses_closes_the_client_without_ok() -> None:
    async def body(rig: Rig) -> None:
        client = await rig.client(b"CONNECT 4000\n")
        [request] = await rig.packets(1)
        assert (request.op, request.dst_port) == (Op.REQUEST, 4000)
        await rig.send(to_host(Op.RST, request.src_port, src_port=4000))
        assert await recv_to_eof(client) == b""  # EOF, no "OK"
        assert rig.backend.device.streams.ports() == ()
        await rig.finish(0)

    scenario(body)


@pytest.mark.parametrize("hello", [b"HELLO 1024\n", b"CONNECT\n", b"CONNECT 1024 1\n",
                                   b"CONNECT " + b"1" * 40])
def test_a_bad_handshake_closes_the_client_and_starts_no_stream(hello: bytes) -> None:
    async def body(rig: Rig) -> None:
        client = await rig.client(hello)
        assert await recv_to_eof(client) == b""
        assert rig.guest.receive() == [] and rig.backend.device.streams.ports() == ()
        await rig.finish(0)

    scenario(body)


def test_handshakes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients, "MAX_HANDSHAKES", 3)

    async def body(rig: Rig) -> None:
        handshaking = rig.backend._clients._handshaking
        silent = []
        for _ in range(3):
            silent.append(await rig.client())
            await until(lambda: len(handshaking) == len(silent), "the client accepted")
        extra = await rig.client(b"CONNECT 1024\n")
        assert await recv_to_eof(extra) == b""  # over the bound: closed at once
        assert rig.guest.receive() == []
        silent[0].close()  # a client that gives up frees its slot
        await until(lambda: len(handshaking) == 2, "the slot freed")
        client, port = await rig.open_stream()
        await rig.loop.sock_sendall(client, b"x")
        [rw] = await rig.packets(1)
        assert (rw.op, rw.payload, rw.src_port) == (Op.RW, b"x", port)
        await rig.finish(0)

    scenario(body)


def test_a_client_that_does_not_read_stops_the_guest_by_credit() -> None:
    """Guest -> client back-pressure: the back-end grants the guest credit back only for
    bytes the client took, so the guest stops and what the back-end holds stays within
    the credit; once the client reads, credit comes back and the rest flows, in order."""

    async def body(rig: Rig) -> None:
        client, port = await rig.open_stream()
        # A small socket buffer: the credit, not the kernel, is what stops the guest.
        held = rig.backend._clients._streams[port]
        held.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(i % 251 for i in range(DEFAULT_BUF_ALLOC + 4 * TX_CHUNK))
        credit = {"buf_alloc": DEFAULT_BUF_ALLOC, "fwd_cnt": 0}
        sent = 0

        def take_updates(got: list[Packet]) -> None:
            for update in got:
                assert update.op == Op.CREDIT_UPDATE, update
                credit.update(buf_alloc=update.buf_alloc, fwd_cnt=update.fwd_cnt)

        async def send_what_fits() -> None:
            """As a Linux guest does: never more than the host's free space."""
            nonlocal sent
            while sent < len(data) and (
                    free := credit["buf_alloc"] - (sent - credit["fwd_cnt"])) > 0:
                size = min(TX_CHUNK, free, len(data) - sent)
                await rig.send(to_host(Op.RW, port, payload=data[sent:sent + size]))
                sent += size
                take_updates(rig.guest.receive())

        await send_what_fits()
        # Out of credit with bytes left: the client read nothing, so no credit came back.
        assert sent == DEFAULT_BUF_ALLOC and credit["fwd_cnt"] == 0
        assert 0 < len(held.outbox) <= DEFAULT_BUF_ALLOC
        reader = asyncio.ensure_future(recv_exactly(client, len(data)))
        while sent < len(data):  # the client reads: credit comes back, the guest goes on
            take_updates(await rig.some_packets())
            await send_what_fits()
        assert await reader == data
        assert credit["fwd_cnt"] > 0 and held.outbox == bytearray()
        await rig.finish(0)

    scenario(body)


def test_a_guest_that_does_not_read_stops_reading_the_client() -> None:
    """Client -> guest back-pressure: the device takes what its bound allows, the back-end
    stops reading the client, and resumes once the guest frees rx buffers."""

    async def body(rig: Rig) -> None:
        client, port = await rig.open_stream()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * (2 * MAX_PENDING // 256)
        writer = asyncio.ensure_future(rig.loop.sock_sendall(client, data))
        stream = rig.backend._clients._streams[port]
        await until(lambda: bool(stream.inbox), "the device to refuse bytes")
        await asyncio.sleep(0.05)  # nothing moves while the guest reads nothing
        assert not writer.done() and rig.backend.device.streams.room(port) == 0
        assert len(stream.inbox) <= clients.READ_CHUNK
        got = bytearray()
        while len(got) < len(data):
            for packet in await rig.some_packets():
                assert packet.op == Op.RW
                got += packet.payload
            os.eventfd_write(rig.kicks[RX], 1)  # rx buffers given back
        assert got == data
        await asyncio.wait_for(writer, TIMEOUT)
        await rig.finish(0)

    scenario(body)


def test_a_vanished_client_closes_the_stream_and_resets_it_after_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients, "CLOSE_TIMEOUT", 0.05)

    async def body(rig: Rig) -> None:
        client, port = await rig.open_stream()
        client.close()
        [shutdown] = await rig.packets(1)
        assert (shutdown.op, shutdown.flags) == (Op.SHUTDOWN, Shutdown.SEND)
        # The guest still writes: the send fails, the client is gone, the stream closes.
        await rig.send(to_host(Op.RW, port, payload=b"anyone there?"))
        [close] = await rig.packets(1)
        # The receive half now (SEND went before): the guest ORs the bits, as Linux does.
        assert (close.op, close.flags) == (Op.SHUTDOWN, Shutdown.RCV)
        assert port in rig.backend.device.streams.ports()
        # The guest never answers with RST: after CLOSE_TIMEOUT the back-end resets it.
        [rst] = await rig.packets(1)
        assert rst.op == Op.RST and rst.src_port == port
        assert rig.backend.device.streams.ports() == ()
        await rig.finish(0)

    scenario(body)


def test_a_ring_restarted_with_new_eventfds_is_watched_on_the_new_kick() -> None:
    """The kick readers follow the control messages: a stopped ring is not read, the old
    kick fd is no longer watched (the device closed it), and the new one is."""

    async def body(rig: Rig) -> None:
        client, port = await rig.open_stream()
        base = await rig.qemu.send(vu.Request.GET_VRING_BASE, vu.VringState(TX, 0))
        assert base == struct.pack("=II", TX, rig.guest.avail[TX])  # every chain was used
        assert rig.backend.device.kick_fd(TX) is None
        rig.guest.send(to_host(Op.RW, port, payload=b"while stopped"))
        os.eventfd_write(rig.kicks[TX], 1)  # the old kick: nobody reads it any more
        await asyncio.sleep(0.02)
        assert rig.guest.used_idx(TX) != rig.guest.avail[TX]
        for fds in (rig.kicks, rig.calls):
            os.close(fds.pop(TX))
            fds[TX] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        await rig.qemu.send(vu.Request.SET_VRING_BASE, vu.VringState(TX, 1), ack=True)
        await rig.qemu.send(vu.Request.SET_VRING_KICK, vu.U64(TX), (rig.kicks[TX],), ack=True)
        await rig.qemu.send(vu.Request.SET_VRING_CALL, vu.U64(TX), (rig.calls[TX],), ack=True)
        await rig.send()  # a kick on the new eventfd: the packet that waited is read now
        assert await recv_exactly(client, 13) == b"while stopped"
        await rig.finish(0)

    scenario(body)


def test_a_device_failure_signals_the_err_eventfd_and_resets_the_streams() -> None:
    async def body(rig: Rig) -> None:
        err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        rig.fds.append(err)
        await rig.qemu.send(vu.Request.SET_VRING_ERR, vu.U64(TX), (err,), ack=True)
        client, _ = await rig.open_stream()
        rig.guest.desc(TX, 0, BASE + 0x20000, 16, 1, 0)  # F_NEXT onto itself: a loop
        rig.guest.offer(TX, 0)
        os.eventfd_write(rig.kicks[TX], 1)
        await readable(err)
        assert os.eventfd_read(err) == 1
        assert rig.backend.device.failure is not None
        assert await recv_to_eof(client) == b""
        await rig.finish(0)

    scenario(body)


# -- the process's entry point ------------------------------------------------------------


def test_main_refuses_fds_that_are_not_unix_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        fd = inet.fileno()
        result = subprocess.run(
            [sys.executable, "-m", "hypervisors.vsock.backend", "--vhost-user-fd", str(fd),
             "--hybrid-fd", str(fd), "--guest-cid", "3", "--name", "t"],
            pass_fds=(fd,), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "vsock-backend[t]: cannot serve" in result.stderr and "not a unix socket" in \
        result.stderr
