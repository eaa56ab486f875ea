"""The vhost-user-vsock device, back-end ("slave") side, sans-IO but for closing fds.

Source: QEMU docs/interop/vhost-user.rst ("Ring states", "Front-end message types"),
hw/virtio/vhost-vsock-common.c (the back-end owns 2 queues, rx=0 and tx=1; the event queue
stays in QEMU); see docs/vsock.md.

Theory of operation: the event loop reads the vhost-user socket into a `vhost_user.Parser`
and hands each `Message` to `VsockDevice.handle`, writing back `Output.reply`. Once both
rings run, it calls `on_tx_kick` / `on_rx_kick` when the kick eventfds fire, and the host
side methods (`connect`, `write`, `consumed`, `close_write`, `close`, `reset`) for its unix
clients. Every call returns an `Output`: the reply, the `HostEvent`s for the clients, and
the queues whose call eventfd to signal. The device never reads or writes an fd, never maps
memory (an injected `Mapper` does), and never raises anything but `VsockError`.

fd ownership: every fd that comes with a message is either kept in exactly one place (the
kick, call and err eventfds of a ring; an old one is closed when replaced, all on reset) or
closed before `handle` returns (memory region fds once mapped, and all of them when the
message is refused).

Ring states: a ring starts on SET_VRING_KICK (its `Virtqueue` is built then, from the
stored size, base and addresses), stops on GET_VRING_BASE, and processes only when
enabled (rings start disabled when VHOST_USER_F_PROTOCOL_FEATURES is negotiated). A
malformed chain (any `VsockError` from the virtqueue) fails the device: every stream is
reset and the rings are left alone until the front-end restarts a ring or resets the
device. A malformed packet in a well-formed chain only resets the stream it names.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from hypervisors.vsock import vhost_user as vu
from hypervisors.vsock.connections import DEFAULT_BUF_ALLOC
from hypervisors.vsock.errors import GuestMemoryError, VhostUserError, VirtqueueError, VsockError
from hypervisors.vsock.packets import HEADER_SIZE, MAX_PAYLOAD, U32
from hypervisors.vsock.streams import HostEvent, StreamTable
from hypervisors.vsock.virtqueue import (
    F_INDIRECT_DESC_FEATURE,
    MAX_QUEUE_SIZE,
    GuestMemory,
    Region,
    Virtqueue,
)

RX, TX = 0, 1
NUM_QUEUES = 2
VIRTIO_F_VERSION_1 = 32
#: What we offer: virtio 1.x, indirect descriptors (the virtqueue follows them) and the
#: vhost-user protocol features. Not EVENT_IDX: the virtqueue does not do it.
DEVICE_FEATURES = (1 << VIRTIO_F_VERSION_1 | 1 << F_INDIRECT_DESC_FEATURE
                   | 1 << vu.F_PROTOCOL_FEATURES)
#: CONFIG is required (QEMU reads the CID with GET_CONFIG); REPLY_ACK and RESET_DEVICE are
#: cheap to honour. Not MQ: a vsock device has one queue pair.
PROTOCOL_FEATURES = (1 << vu.PROTOCOL_F_CONFIG | 1 << vu.PROTOCOL_F_REPLY_ACK
                     | 1 << vu.PROTOCOL_F_RESET_DEVICE)
#: A tx chain carries one packet: a header and at most a 64 KiB payload.
MAX_TX_PACKET = HEADER_SIZE + MAX_PAYLOAD
#: An rx chain must hold a header and a byte of data, else RW packets could not progress.
MIN_RX_BUFFER = HEADER_SIZE + 1
#: VHOST_VRING_F_LOG (dirty logging for migration), which we do not support.
_VRING_F_LOG = 1

#: Maps ``size`` bytes of `fd` from ``offset``; returns a writable view of exactly them.
Mapper = Callable[[int, int, int], memoryview]
#: Undoes one `Mapper` call (the device has dropped every view into it).
Unmapper = Callable[[memoryview], None]


@dataclass
class Output:
    """What the event loop must do after one call."""

    reply: bytes | None = None
    events: list[HostEvent] = field(default_factory=list)
    signal: set[int] = field(default_factory=set)  # queues whose call eventfd to write
    failure: str | None = None  # set when this call failed the device


@dataclass
class _Vring:
    num: int = 0
    base: int = 0
    addrs: tuple[int, int, int] | None = None  # desc, avail, used (guest-physical)
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    queue: Virtqueue | None = None  # present while the ring is started


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):  # already gone: nothing left to release
            os.close(fd)


class VsockDevice:
    """One vhost-user-vsock device: the control path and the data path."""

    def __init__(self, guest_cid: int, mapper: Mapper, unmapper: Unmapper | None = None, *,
                 buf_alloc: int = DEFAULT_BUF_ALLOC) -> None:
        """A device for guest `guest_cid` (3 up to 2^32 - 2: 0-2 and -1 are reserved)."""
        if not 3 <= guest_cid < U32:
            raise VhostUserError(f"guest CID {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid
        self._mapper = mapper
        self._unmapper = unmapper or (lambda view: view.release())
        self.streams = StreamTable(guest_cid, buf_alloc=buf_alloc)
        self.owner = False
        self.features = 0
        self.protocol_features = 0
        self.failure: str | None = None
        self._memory: GuestMemory | None = None
        self._maps: list[memoryview] = []
        self._rings = [_Vring() for _ in range(NUM_QUEUES)]
        self._handlers: dict[vu.Request, Callable[[vu.Message, set[int]], Output]] = {
            vu.Request.GET_FEATURES: self._get_features,
            vu.Request.SET_FEATURES: self._set_features,
            vu.Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            vu.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            vu.Request.GET_QUEUE_NUM: self._get_queue_num,
            vu.Request.SET_OWNER: self._set_owner,
            vu.Request.RESET_OWNER: self._reset_owner,
            vu.Request.RESET_DEVICE: self._reset_device,
            vu.Request.SET_MEM_TABLE: self._set_mem_table,
            vu.Request.SET_VRING_NUM: self._set_vring_num,
            vu.Request.SET_VRING_BASE: self._set_vring_base,
            vu.Request.SET_VRING_ADDR: self._set_vring_addr,
            vu.Request.GET_VRING_BASE: self._get_vring_base,
            vu.Request.SET_VRING_KICK: self._set_vring_fd,
            vu.Request.SET_VRING_CALL: self._set_vring_fd,
            vu.Request.SET_VRING_ERR: self._set_vring_fd,
            vu.Request.SET_VRING_ENABLE: self._set_vring_enable,
            vu.Request.GET_CONFIG: self._get_config,
            vu.Request.SET_CONFIG: self._set_config,
        }

    # -- control path -----------------------------------------------------------------

    def handle(self, message: vu.Message) -> Output:
        """Apply one front-end message; a refused one raises `VhostUserError`."""
        adopted: set[int] = set()
        try:
            out = self._handlers[message.request](message, adopted)
        finally:
            for fd in message.fds:
                if fd not in adopted:
                    _close(fd)
        if out.reply is None and vu.needs_reply(message, self.protocol_features):
            out.reply = vu.build_ack(message.request)
        return out

    def kick_fd(self, index: int) -> int | None:
        """The eventfd the guest kicks for queue `index` (None: not set, or polling)."""
        return self._ring(index).kick

    def call_fd(self, index: int) -> int | None:
        """The eventfd to write to interrupt the guest for queue `index`."""
        return self._ring(index).call

    def err_fd(self, index: int) -> int | None:
        """The eventfd to write when queue `index` failed."""
        return self._ring(index).err

    def running(self, index: int) -> bool:
        """Whether queue `index` is started and enabled (and the device not failed)."""
        ring = self._ring(index)
        enabled = ring.enabled or not self.features >> vu.F_PROTOCOL_FEATURES & 1
        return ring.queue is not None and enabled and self.failure is None

    def close(self) -> None:
        """The front-end is gone: drop the streams, close every fd, unmap the memory."""
        self._reset("the vhost-user connection closed")
        self.owner = False

    def _ring(self, index: int) -> _Vring:
        if not 0 <= index < NUM_QUEUES:
            raise VhostUserError(f"vring {index} does not exist: the device has "
                                 f"{NUM_QUEUES} queues")
        return self._rings[index]

    def _get_features(self, message: vu.Message, adopted: set[int]) -> Output:
        return Output(vu.build_reply(message.request, vu.U64(DEVICE_FEATURES)))

    def _set_features(self, message: vu.Message, adopted: set[int]) -> Output:
        value = _u64(message)
        if value & ~DEVICE_FEATURES:
            raise VhostUserError(f"SET_FEATURES {value:#x} acks features not offered")
        if any(ring.queue is not None for ring in self._rings):
            raise VhostUserError("SET_FEATURES while a ring runs")
        self.features = value
        return Output()

    def _get_protocol_features(self, message: vu.Message, adopted: set[int]) -> Output:
        return Output(vu.build_reply(message.request, vu.U64(PROTOCOL_FEATURES)))

    def _set_protocol_features(self, message: vu.Message, adopted: set[int]) -> Output:
        value = _u64(message)
        if value & ~PROTOCOL_FEATURES:
            raise VhostUserError(f"SET_PROTOCOL_FEATURES {value:#x} acks features not offered")
        self.protocol_features = value
        return Output()

    def _get_queue_num(self, message: vu.Message, adopted: set[int]) -> Output:
        return Output(vu.build_reply(message.request, vu.U64(NUM_QUEUES)))

    def _set_owner(self, message: vu.Message, adopted: set[int]) -> Output:
        self.owner = True
        return Output()

    def _reset_owner(self, message: vu.Message, adopted: set[int]) -> Output:
        out = self._reset("the front-end reset the owner")
        self.owner = False
        return out

    def _reset_device(self, message: vu.Message, adopted: set[int]) -> Output:
        return self._reset("the front-end reset the device")

    def _reset(self, reason: str) -> Output:
        self.streams.reset_all(reason)
        out = Output(events=self.streams.take_events())
        for ring in self._rings:
            for fd in (ring.kick, ring.call, ring.err):
                _close(fd)
            ring.queue = None  # its views into the mappings must go before the unmap
        self._rings = [_Vring() for _ in range(NUM_QUEUES)]
        self._unmap_all()
        self.features = 0
        self.failure = None
        return out

    def _unmap_all(self) -> None:
        self._memory = None
        maps, self._maps = self._maps, []
        for view in maps:
            self._unmapper(view)

    def _require(self, what: str, *, memory: bool = False) -> None:
        if not self.owner:
            raise VhostUserError(f"{what} before SET_OWNER")
        if memory and self._memory is None:
            raise VhostUserError(f"{what} before SET_MEM_TABLE")

    def _set_mem_table(self, message: vu.Message, adopted: set[int]) -> Output:
        self._require("SET_MEM_TABLE")
        table = message.payload
        if not isinstance(table, vu.MemoryTable):
            raise VhostUserError("SET_MEM_TABLE without a memory table")
        maps: list[memoryview] = []
        try:
            for region, fd in zip(table.regions, message.fds, strict=True):
                maps.append(self._map(fd, region))
            memory = GuestMemory([Region(r.guest_addr, r.size, r.user_addr, 0, view)
                                  for r, view in zip(table.regions, maps, strict=True)])
            queues = [self._build_queue(ring, memory) if ring.queue else None
                      for ring in self._rings]
        except BaseException:
            for view in maps:
                self._unmapper(view)
            raise
        # A hot-plug table replaces the old one: rebuild running queues over it (same
        # positions), then drop every view into the old mappings before unmapping them.
        for ring, queue in zip(self._rings, queues, strict=True):
            ring.queue = queue
        self._unmap_all()
        self._memory, self._maps = memory, maps
        return Output()

    def _map(self, fd: int, region: vu.MemoryRegion) -> memoryview:
        try:
            view = self._mapper(fd, region.size, region.mmap_offset)
        except (OSError, ValueError) as exc:
            raise VhostUserError(f"cannot map memory region {region}: {exc}") from exc
        if len(view) != region.size or view.readonly:
            self._unmapper(view)
            raise VhostUserError(f"mapper gave {len(view)} bytes for a {region.size}-byte "
                                 "region, or a read-only view")
        return view

    def _stopped_ring(self, message: vu.Message, what: str) -> _Vring:
        self._require(what)
        payload = message.payload
        if not isinstance(payload, vu.VringState | vu.VringAddr):
            raise VhostUserError(f"{what} without a vring index")
        ring = self._ring(payload.index)
        if ring.queue is not None:
            raise VhostUserError(f"{what} on vring {payload.index} while it runs")
        return ring

    def _set_vring_num(self, message: vu.Message, adopted: set[int]) -> Output:
        ring = self._stopped_ring(message, "SET_VRING_NUM")
        num = _state(message).num
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VhostUserError(f"queue size {num} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        ring.num = num
        return Output()

    def _set_vring_base(self, message: vu.Message, adopted: set[int]) -> Output:
        ring = self._stopped_ring(message, "SET_VRING_BASE")
        base = _state(message).num
        if base > 0xFFFF:
            raise VhostUserError(f"vring base {base} does not fit a 16-bit index")
        ring.base = base
        return Output()

    def _set_vring_addr(self, message: vu.Message, adopted: set[int]) -> Output:
        ring = self._stopped_ring(message, "SET_VRING_ADDR")
        self._require("SET_VRING_ADDR", memory=True)
        addr = message.payload
        if not isinstance(addr, vu.VringAddr) or self._memory is None:
            raise VhostUserError("SET_VRING_ADDR without an address")
        if addr.flags & _VRING_F_LOG:
            raise VhostUserError("vring dirty logging (migration) is not supported")
        to_guest = self._memory.user_to_guest
        ring.addrs = (to_guest(addr.desc), to_guest(addr.avail), to_guest(addr.used))
        return Output()

    def _get_vring_base(self, message: vu.Message, adopted: set[int]) -> Output:
        self._require("GET_VRING_BASE")
        index = _state(message).index
        ring = self._ring(index)
        if ring.queue is not None:
            ring.base = ring.queue.last_avail_idx
        ring.queue = None
        _close(ring.kick)
        _close(ring.call)
        ring.kick = ring.call = None
        return Output(vu.build_reply(message.request, vu.VringState(index, ring.base)))

    def _set_vring_fd(self, message: vu.Message, adopted: set[int]) -> Output:
        request = message.request
        self._require(request.name)
        value = _u64(message)
        if value & ~(vu.VRING_INDEX_MASK | vu.VRING_NOFD_MASK):
            raise VhostUserError(f"{request.name}: unknown bits in {value:#x}")
        ring = self._ring(value & vu.VRING_INDEX_MASK)
        fd = message.fds[0] if message.fds else None
        if request == vu.Request.SET_VRING_KICK:
            self._start(ring)
            _close(ring.kick)
            ring.kick = fd
        elif request == vu.Request.SET_VRING_CALL:
            _close(ring.call)
            ring.call = fd
        else:
            _close(ring.err)
            ring.err = fd
        if fd is not None:
            adopted.add(fd)
        return Output()

    def _start(self, ring: _Vring) -> None:
        self._require("SET_VRING_KICK", memory=True)
        if self._memory is None or ring.addrs is None or not ring.num:
            raise VhostUserError("SET_VRING_KICK before the ring's size and addresses")
        ring.queue = self._build_queue(ring, self._memory)
        self.failure = None  # a restarted ring gets another chance

    def _build_queue(self, ring: _Vring, memory: GuestMemory) -> Virtqueue:
        if ring.addrs is None:
            raise VhostUserError("vring has no addresses")
        base = ring.queue.last_avail_idx if ring.queue else ring.base
        desc, avail, used = ring.addrs
        indirect = bool(self.features >> F_INDIRECT_DESC_FEATURE & 1)
        try:
            return Virtqueue(memory, ring.num, desc, avail, used, indirect=indirect,
                             last_avail_idx=base)
        except (GuestMemoryError, VirtqueueError) as exc:
            raise VhostUserError(f"vring does not fit guest memory: {exc}") from exc

    def _set_vring_enable(self, message: vu.Message, adopted: set[int]) -> Output:
        self._require("SET_VRING_ENABLE")
        state = _state(message)
        if state.num not in (0, 1):
            raise VhostUserError(f"SET_VRING_ENABLE {state.num}: expected 0 or 1")
        self._ring(state.index).enabled = bool(state.num)
        return self.on_rx_kick() if state.num else Output()

    def _get_config(self, message: vu.Message, adopted: set[int]) -> Output:
        window = message.payload
        if not isinstance(window, vu.DeviceConfig):
            raise VhostUserError("GET_CONFIG without a config window")
        answer = vu.vsock_config(self.guest_cid, window)
        return Output(vu.build_reply(message.request, answer))

    def _set_config(self, message: vu.Message, adopted: set[int]) -> Output:
        raise VhostUserError("the vsock config space (the guest CID) is read-only")

    # -- data path --------------------------------------------------------------------

    def on_tx_kick(self) -> Output:
        """The guest sent packets: route them, then fill rx with whatever is due."""
        out = Output()
        ring = self._rings[TX]
        if self.running(TX) and ring.queue is not None:
            try:
                while (chain := ring.queue.pop()) is not None:
                    data = chain.read(limit=MAX_TX_PACKET)
                    ring.queue.push(chain.head, 0)
                    out.signal.add(TX)
                    self.streams.receive_bytes(data)
            except VsockError as exc:
                return self._fail(f"tx queue: {exc}", out)
        return self._deliver(out)

    def on_rx_kick(self) -> Output:
        """The guest added rx buffers: fill them with pending packets."""
        return self._deliver(Output())

    def _deliver(self, out: Output) -> Output:
        ring = self._rings[RX]
        if self.running(RX) and ring.queue is not None:
            try:
                while self.streams.has_output() and (chain := ring.queue.pop()) is not None:
                    if chain.writable_len < MIN_RX_BUFFER:
                        raise VirtqueueError(f"rx chain {chain.head} has room for "
                                             f"{chain.writable_len} bytes, less than "
                                             f"{MIN_RX_BUFFER}")
                    data = self.streams.next_packet(chain.writable_len) or b""
                    ring.queue.push(chain.head, chain.write(data))
                    out.signal.add(RX)
            except VsockError as exc:
                return self._fail(f"rx queue: {exc}", out)
        out.events.extend(self.streams.take_events())
        return out

    def _fail(self, reason: str, out: Output) -> Output:
        self.failure = out.failure = reason
        self.streams.reset_all(f"device failed: {reason}")
        out.events.extend(self.streams.take_events())
        return out

    # -- host side --------------------------------------------------------------------

    def connect(self, guest_port: int) -> tuple[int, Output]:
        """A host client asked for `guest_port`: start the stream, return its host port."""
        if self.failure is not None:
            raise VhostUserError(f"the device failed: {self.failure}")
        port = self.streams.connect(guest_port)
        return port, self._deliver(Output())

    def write(self, port: int, data: bytes) -> tuple[int, Output]:
        """Client bytes for the guest; returns how many were taken (back-pressure)."""
        taken = self.streams.write(port, data)
        return taken, self._deliver(Output())

    def consumed(self, port: int, count: int) -> Output:
        """The client took `count` bytes of `Data`."""
        self.streams.consumed(port, count)
        return self._deliver(Output())

    def close_write(self, port: int) -> Output:
        """The client sent EOF."""
        self.streams.close_write(port)
        return self._deliver(Output())

    def close_stream(self, port: int) -> Output:
        """The client is gone."""
        self.streams.close(port)
        return self._deliver(Output())

    def reset_stream(self, port: int) -> Output:
        """Abort a stream (e.g. the client took too long)."""
        self.streams.reset(port)
        return self._deliver(Output())


def _u64(message: vu.Message) -> int:
    if not isinstance(message.payload, vu.U64):
        raise VhostUserError(f"{message.request.name} without a u64 payload")
    return message.payload.value


def _state(message: vu.Message) -> vu.VringState:
    if not isinstance(message.payload, vu.VringState):
        raise VhostUserError(f"{message.request.name} without a vring state")
    return message.payload
