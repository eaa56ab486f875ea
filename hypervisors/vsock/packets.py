"""The virtio-vsock packet: a 44-byte little-endian header and, for RW only, a payload.

Source: virtio 1.2, 5.10 "Socket Device", 5.10.6 "Device Operation", checked field by field
against Linux include/uapi/linux/virtio_vsock.h (``struct virtio_vsock_hdr``, packed)::

    src_cid u64 | dst_cid u64 | src_port u32 | dst_port u32 | len u32
    type u16 | op u16 | flags u32 | buf_alloc u32 | fwd_cnt u32

``type`` is 1 for STREAM (the only type we speak; SEQPACKET needs a feature bit we do not
offer). ``op`` is REQUEST=1, RESPONSE=2, RST=3, SHUTDOWN=4, RW=5, CREDIT_UPDATE=6,
CREDIT_REQUEST=7 (0 is INVALID). SHUTDOWN ``flags`` are RCV=1, SEND=2. Every packet carries
the sender's ``buf_alloc`` and ``fwd_cnt`` (flow control, see `connections`).

Validation (everything here comes from the guest): the header's ``len`` must equal the
payload that came with it, only RW carries a payload, at most `MAX_PAYLOAD` bytes, a known
type and op, and no unknown SHUTDOWN flag bits. A bad packet raises `PacketError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from hypervisors.vsock.errors import PacketError

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44
#: Largest RW payload we build or accept: Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE (64 KiB).
MAX_PAYLOAD = 64 * 1024
#: Well-known CIDs (virtio 1.2 5.10.4): the host is 2; guests get 3 and up.
HOST_CID = 2
U32 = 0xFFFFFFFF


class Type(enum.IntEnum):
    """``virtio_vsock_type``."""

    STREAM = 1


class Op(enum.IntEnum):
    """``virtio_vsock_op`` (INVALID=0 is never legal on the wire)."""

    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class Shutdown(enum.IntFlag):
    """``virtio_vsock_shutdown``: which directions the sender will no longer use."""

    NONE = 0
    RCV = 1
    SEND = 2
    BOTH = 3


@dataclass(frozen=True)
class Packet:
    """One packet; ``len`` on the wire is ``len(payload)``."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: Op
    type: Type = Type.STREAM
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    payload: bytes = b""

    def reply(self, op: Op, *, flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0) -> Packet:
        """A payload-less packet back to this packet's sender (addresses swapped)."""
        return Packet(self.dst_cid, self.src_cid, self.dst_port, self.src_port, op,
                      self.type, flags, buf_alloc, fwd_cnt)


def build(packet: Packet) -> bytes:
    """Header + payload bytes for `packet`, validated as strictly as `parse` would."""
    _check(packet.type, packet.op, packet.flags, len(packet.payload))
    try:
        header = HEADER.pack(packet.src_cid, packet.dst_cid, packet.src_port, packet.dst_port,
                             len(packet.payload), packet.type, packet.op, packet.flags,
                             packet.buf_alloc, packet.fwd_cnt)
    except struct.error as exc:
        raise PacketError(f"failed to build vsock packet: field out of range: {exc}") from exc
    return header + packet.payload


def parse(data: bytes | bytearray | memoryview) -> Packet:
    """The packet in `data` (exactly one header and its payload)."""
    if len(data) < HEADER_SIZE:
        raise PacketError(f"vsock packet of {len(data)} bytes is shorter than its header")
    (src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc,
     fwd_cnt) = HEADER.unpack_from(data)
    if length != len(data) - HEADER_SIZE:
        raise PacketError(f"vsock header says len {length} but {len(data) - HEADER_SIZE} "
                          "payload bytes came with it")
    _check(type_, op, flags, length)
    return Packet(src_cid, dst_cid, src_port, dst_port, Op(op), Type(type_), flags,
                  buf_alloc, fwd_cnt, bytes(data[HEADER_SIZE:]))


def payload_length(header: bytes | bytearray | memoryview) -> int:
    """The ``len`` field of a header, bounded: what a reader must fetch after the header."""
    if len(header) < HEADER_SIZE:
        raise PacketError(f"vsock header of {len(header)} bytes is truncated")
    length: int = HEADER.unpack_from(header)[4]
    if length > MAX_PAYLOAD:
        raise PacketError(f"vsock payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return length


def _check(type_: int, op: int, flags: int, length: int) -> None:
    if type_ not in Type._value2member_map_:
        raise PacketError(f"unknown vsock socket type {type_}")
    if op not in Op._value2member_map_:
        raise PacketError(f"unknown vsock op {op}")
    if length > MAX_PAYLOAD:
        raise PacketError(f"vsock payload of {length} bytes exceeds {MAX_PAYLOAD}")
    if length and op != Op.RW:
        raise PacketError(f"vsock op {Op(op).name} carries {length} payload bytes")
    if op == Op.SHUTDOWN and flags & ~int(Shutdown.BOTH):
        raise PacketError(f"unknown vsock shutdown flags {flags:#x}")
