"""The vhost-user message layer, back-end side, sans-IO: bytes + fds in, typed messages out.

Source: QEMU docs/interop/vhost-user.rst ("Message Specification", "Communication",
"Front-end message types", "VHOST_USER_PROTOCOL_F_REPLY_ACK"); struct layouts from Linux
include/uapi/linux/vhost_types.h. Numbers are in the machine's native byte order.

Header (12 bytes): ``request u32 | flags u32 | size u32``. Flags: bits 0-1 the version
(1), bit 2 (0x4) marks a reply, bit 3 (0x8) asks for a REPLY_ACK. Payloads we handle:

* none: GET_FEATURES, SET_OWNER, RESET_OWNER, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
  RESET_DEVICE;
* u64: SET_FEATURES, SET_PROTOCOL_FEATURES, SET_VRING_KICK/CALL/ERR (bits 0-7 the vring
  index, bit 8 "no fd": polling);
* vring state (index u32, num u32): SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE,
  SET_VRING_ENABLE;
* vring address (index u32, flags u32, desc u64, used u64, avail u64, log u64; 40 bytes,
  ``struct vhost_vring_addr``; ring addresses are front-end *user* addresses);
* memory table (nregions u32, padding u32, then per region guest_addr u64, size u64,
  user_addr u64, mmap_offset u64), exactly ``nregions`` of them (as QEMU sizes it), at
  most 8, one fd per region in order;
* device config (offset u32, size u32, flags u32, then ``size`` bytes, at most 256 as in
  QEMU's VHOST_USER_MAX_CONFIG_SIZE): GET_CONFIG, SET_CONFIG.

Replies are required for GET_FEATURES, GET_PROTOCOL_FEATURES, GET_VRING_BASE,
GET_QUEUE_NUM and GET_CONFIG, and for any request with need_reply set once REPLY_ACK is
negotiated (a u64: 0 success, non-zero failure). fds ride in SCM_RIGHTS with the first byte
of their message: the caller passes them to `Parser.feed` together with those bytes.

Bounds: a request code we do not handle, a size beyond that request's largest legal payload,
a wrong fd count or a bad flag raises `VhostUserError` as soon as the header is seen, before
any payload is buffered; the error is sticky. The vsock device config space is the 64-bit
guest CID (virtio 1.2 5.10.4 "Device configuration layout"; see `vsock_config`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from hypervisors.vsock.errors import VhostUserError

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_REGIONS = 8
MAX_CONFIG_SIZE = 256
#: SET_VRING_KICK/CALL/ERR u64: bits 0-7 index, bit 8 "no fd in the ancillary data".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
#: Feature bit 30, VHOST_USER_F_PROTOCOL_FEATURES.
F_PROTOCOL_FEATURES = 30
#: Protocol feature bits (vhost-user.rst "Protocol features").
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_RESET_DEVICE = 13

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")
_MEM_HEAD = struct.Struct("=II")
_REGION = struct.Struct("=QQQQ")
_CONFIG_HEAD = struct.Struct("=III")


class Request(enum.IntEnum):
    """Front-end request codes (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34


@dataclass(frozen=True)
class NoPayload:
    """The request carries nothing."""


@dataclass(frozen=True)
class U64:
    """A single 64-bit integer."""

    value: int


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``; addresses are front-end user addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class MemoryRegion:
    """One region of SET_MEM_TABLE (its fd is the message's fd at the same position)."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class MemoryTable:
    """SET_MEM_TABLE: up to `MAX_REGIONS` regions."""

    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True)
class DeviceConfig:
    """GET_CONFIG / SET_CONFIG: a window on the device's config space."""

    offset: int
    flags: int
    data: bytes


Payload = NoPayload | U64 | VringState | VringAddr | MemoryTable | DeviceConfig


class _Kind(enum.Enum):
    NONE = (NoPayload, 0)
    U64 = (U64, _U64.size)
    STATE = (VringState, _STATE.size)
    ADDR = (VringAddr, _ADDR.size)
    MEMORY = (MemoryTable, _MEM_HEAD.size + MAX_REGIONS * _REGION.size)
    CONFIG = (DeviceConfig, _CONFIG_HEAD.size + MAX_CONFIG_SIZE)

    @property
    def max_size(self) -> int:
        size: int = self.value[1]
        return size


_KINDS: dict[Request, _Kind] = {
    Request.GET_FEATURES: _Kind.NONE, Request.SET_OWNER: _Kind.NONE,
    Request.RESET_OWNER: _Kind.NONE, Request.GET_PROTOCOL_FEATURES: _Kind.NONE,
    Request.GET_QUEUE_NUM: _Kind.NONE, Request.RESET_DEVICE: _Kind.NONE,
    Request.SET_FEATURES: _Kind.U64, Request.SET_PROTOCOL_FEATURES: _Kind.U64,
    Request.SET_VRING_KICK: _Kind.U64, Request.SET_VRING_CALL: _Kind.U64,
    Request.SET_VRING_ERR: _Kind.U64,
    Request.SET_VRING_NUM: _Kind.STATE, Request.SET_VRING_BASE: _Kind.STATE,
    Request.GET_VRING_BASE: _Kind.STATE, Request.SET_VRING_ENABLE: _Kind.STATE,
    Request.SET_VRING_ADDR: _Kind.ADDR, Request.SET_MEM_TABLE: _Kind.MEMORY,
    Request.GET_CONFIG: _Kind.CONFIG, Request.SET_CONFIG: _Kind.CONFIG,
}
#: Requests whose reply is part of the protocol, REPLY_ACK or not.
ALWAYS_REPLY = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                          Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_CONFIG})
_VRING_FD_REQUESTS = (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR)
#: The largest message any handled request may be: what a reader ever needs to buffer.
MAX_MESSAGE = HEADER_SIZE + max(kind.max_size for kind in _Kind)


@dataclass(frozen=True)
class Message:
    """One request from the front-end, with the fds that came with it."""

    request: Request
    payload: Payload
    need_reply: bool = False
    fds: tuple[int, ...] = ()


def needs_reply(message: Message, protocol_features: int) -> bool:
    """Whether the back-end must answer `message` (given the negotiated protocol features)."""
    if message.request in ALWAYS_REPLY:
        return True
    return message.need_reply and bool(protocol_features >> PROTOCOL_F_REPLY_ACK & 1)


def expected_fds(request: Request, payload: Payload) -> int:
    """How many fds must come with this request."""
    if request == Request.SET_MEM_TABLE and isinstance(payload, MemoryTable):
        return len(payload.regions)
    if request in _VRING_FD_REQUESTS and isinstance(payload, U64):
        return 0 if payload.value & VRING_NOFD_MASK else 1
    return 0


def encode_payload(payload: Payload) -> bytes:
    """The wire bytes of a payload."""
    try:
        if isinstance(payload, NoPayload):
            return b""
        if isinstance(payload, U64):
            return _U64.pack(payload.value)
        if isinstance(payload, VringState):
            return _STATE.pack(payload.index, payload.num)
        if isinstance(payload, VringAddr):
            return _ADDR.pack(payload.index, payload.flags, payload.desc, payload.used,
                              payload.avail, payload.log)
        if isinstance(payload, MemoryTable):
            if len(payload.regions) > MAX_REGIONS:
                raise VhostUserError(f"{len(payload.regions)} memory regions, max {MAX_REGIONS}")
            return _MEM_HEAD.pack(len(payload.regions), 0) + b"".join(
                _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
                for r in payload.regions)
        if len(payload.data) > MAX_CONFIG_SIZE:
            raise VhostUserError(f"config window of {len(payload.data)} bytes, max "
                                 f"{MAX_CONFIG_SIZE}")
        return _CONFIG_HEAD.pack(payload.offset, len(payload.data), payload.flags) + payload.data
    except struct.error as exc:
        raise VhostUserError(f"failed to encode vhost-user payload: {exc}") from exc


def encode_message(request: int, payload: Payload, *, flags: int = VERSION) -> bytes:
    """Header + payload (what the front-end sends; tests and tools use it too)."""
    body = encode_payload(payload)
    return HEADER.pack(request, flags, len(body)) + body


def build_reply(request: Request, payload: Payload) -> bytes:
    """The back-end's reply to `request`: same code, version 1 with the reply bit."""
    return encode_message(request, payload, flags=VERSION | FLAG_REPLY)


def build_ack(request: Request, ok: bool = True) -> bytes:
    """A REPLY_ACK answer: u64 0 for success, 1 for failure."""
    return build_reply(request, U64(0 if ok else 1))


def vsock_config(guest_cid: int, window: DeviceConfig) -> DeviceConfig:
    """GET_CONFIG's answer for a vsock device: the requested slice of ``le64 guest_cid``.

    A window outside the 8 bytes gets an empty payload, which vhost-user.rst defines as the
    back-end's error answer to GET_CONFIG.
    """
    space = struct.pack("<Q", guest_cid)
    end = window.offset + len(window.data)
    if end > len(space):
        return DeviceConfig(window.offset, window.flags, b"")
    return DeviceConfig(window.offset, window.flags, space[window.offset:end])


class Parser:
    """Bytes and fds from the socket in, `Message`s out; bounded and sticky on error."""

    def __init__(self) -> None:
        """Start with nothing buffered."""
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._error: VhostUserError | None = None

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """fds received but not yet handed out: the caller closes these on error."""
        return tuple(self._fds)

    def feed(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> list[Message]:
        """Add what one recvmsg returned; return every message it completed."""
        self._fds.extend(fds)  # first, so that `pending_fds` lists every fd to close
        if self._error:
            raise self._error
        self._buffer += data
        messages: list[Message] = []
        try:
            while (message := self._next()) is not None:
                messages.append(message)
            if not self._buffer and self._fds:
                raise VhostUserError(f"{len(self._fds)} fds came with no message to carry them")
        except VhostUserError as exc:
            self._error = exc
            raise
        return messages

    def _next(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        code, flags, size = HEADER.unpack_from(self._buffer)
        request = _check_header(code, flags, size)
        if len(self._buffer) < HEADER_SIZE + size:
            return None
        body = bytes(self._buffer[HEADER_SIZE:HEADER_SIZE + size])
        payload = _decode(request, body)
        want = expected_fds(request, payload)
        if len(self._fds) < want:
            raise VhostUserError(f"{request.name} needs {want} fds, {len(self._fds)} came")
        fds, self._fds = tuple(self._fds[:want]), self._fds[want:]
        del self._buffer[:HEADER_SIZE + size]
        return Message(request, payload, bool(flags & FLAG_NEED_REPLY), fds)


def _check_header(code: int, flags: int, size: int) -> Request:
    if code not in Request._value2member_map_:
        raise VhostUserError(f"unsupported vhost-user request {code}")
    request = Request(code)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"{request.name}: vhost-user version {flags & VERSION_MASK}")
    if flags & ~(VERSION_MASK | FLAG_NEED_REPLY):
        raise VhostUserError(f"{request.name}: unexpected flags {flags:#x}")
    if size > _KINDS[request].max_size:
        raise VhostUserError(f"{request.name}: payload of {size} bytes exceeds "
                             f"{_KINDS[request].max_size}")
    return request


def _decode(request: Request, body: bytes) -> Payload:
    kind = _KINDS[request]
    if kind is _Kind.MEMORY:
        return _decode_memory(request, body)
    if kind is _Kind.CONFIG:
        return _decode_config(request, body)
    if len(body) != kind.max_size:
        raise VhostUserError(f"{request.name}: payload of {len(body)} bytes, expected "
                             f"{kind.max_size}")
    if kind is _Kind.U64:
        return U64(*_U64.unpack(body))
    if kind is _Kind.STATE:
        return VringState(*_STATE.unpack(body))
    if kind is _Kind.ADDR:
        return VringAddr(*_ADDR.unpack(body))
    return NoPayload()


def _decode_memory(request: Request, body: bytes) -> MemoryTable:
    if len(body) < _MEM_HEAD.size:
        raise VhostUserError(f"{request.name}: payload of {len(body)} bytes is truncated")
    count = _MEM_HEAD.unpack_from(body)[0]
    # QEMU sends exactly nregions regions (vhost_user_fill_set_mem_table_msg).
    if count > MAX_REGIONS or len(body) != _MEM_HEAD.size + count * _REGION.size:
        raise VhostUserError(f"{request.name}: {count} regions in {len(body)} bytes")
    regions = tuple(
        MemoryRegion(*_REGION.unpack_from(body, _MEM_HEAD.size + i * _REGION.size))
        for i in range(count))
    for region in regions:
        if region.size == 0 or region.guest_addr + region.size > 1 << 64 \
                or region.user_addr + region.size > 1 << 64:
            raise VhostUserError(f"{request.name}: region {region} is empty or wraps")
    return MemoryTable(regions)


def _decode_config(request: Request, body: bytes) -> DeviceConfig:
    if len(body) < _CONFIG_HEAD.size:
        raise VhostUserError(f"{request.name}: payload of {len(body)} bytes is truncated")
    offset, size, flags = _CONFIG_HEAD.unpack_from(body)
    if size > MAX_CONFIG_SIZE or len(body) != _CONFIG_HEAD.size + size:
        raise VhostUserError(f"{request.name}: config size {size} in a {len(body)}-byte "
                             "payload")
    return DeviceConfig(offset, flags, body[_CONFIG_HEAD.size:])
