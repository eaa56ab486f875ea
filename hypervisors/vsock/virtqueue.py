"""A split virtqueue over guest memory the caller supplies, with nothing taken on trust.

Source: virtio 1.2, 2.7 "Split Virtqueues" (2.7.5 descriptor table, 2.7.5.3 indirect
descriptors, 2.7.6 available ring, 2.7.8 used ring), cross-checked against Linux
include/uapi/linux/virtio_ring.h. All fields are little-endian (virtio 1.x)::

    descriptor (16 bytes): addr u64 | len u32 | flags u16 (NEXT=1 WRITE=2 INDIRECT=4) | next u16
    available ring: flags u16 | idx u16 | ring[size] u16 (| used_event u16)
    used ring:      flags u16 | idx u16 | ring[size] of (id u32, len u32) (| avail_event u16)

``idx`` fields are free-running 16-bit counters; slot = idx % size (size is a power of 2,
at most 32768, so the counters wrap from 65535 to 0 without breaking the slot arithmetic).

Theory of operation: `GuestMemory` maps guest-physical ranges (the regions of vhost-user
SET_MEM_TABLE) onto bytes-like buffers (the caller's mmaps); every access is bounds-checked
and never spans two regions. `Virtqueue.pop` reads the next available head and walks its
chain; `Virtqueue.push` publishes a used element. No I/O, no notification: the caller kicks
and calls through its eventfds. Event-index suppression (VIRTIO_RING_F_EVENT_IDX) is not
supported, so the caller must not offer that feature.

Everything read from the rings is guest-controlled. A malformed chain raises a
`VirtqueueError` subclass naming the fault (or `GuestMemoryError` for an address outside
every region); the caller resets the device. The walk is bounded by the queue size, so a
loop cannot make it spin, and no Python IndexError can escape.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypervisors.vsock.errors import GuestMemoryError, VirtqueueError

DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16
USED_ELEM = struct.Struct("<II")
U16 = struct.Struct("<H")
F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
#: Largest split queue (virtio 1.2 2.7: "Queue Size ... maximum 32768").
MAX_QUEUE_SIZE = 32768
#: VIRTIO_RING_F_INDIRECT_DESC (feature bit 28).
F_INDIRECT_DESC_FEATURE = 28


class DescriptorIndexError(VirtqueueError):
    """A head or ``next`` index is not below the queue (or indirect table) size."""


class ChainLoopError(VirtqueueError):
    """A chain visits the same descriptor twice."""


class ChainTooLongError(VirtqueueError):
    """A chain has more descriptors than its table."""


class DescriptorOrderError(VirtqueueError):
    """A device-readable descriptor follows a device-writable one."""


class IndirectError(VirtqueueError):
    """An indirect descriptor that is not negotiated, nested, chained or mis-sized."""


class RingIndexError(VirtqueueError):
    """The driver's available idx ran more than a queue's worth ahead of us."""


@dataclass(frozen=True)
class Region:
    """One shared region: guest-physical range -> ``mapping[mmap_offset:mmap_offset+size]``.

    ``user_addr`` is the front-end's virtual address of the same range; vhost-user ring
    addresses (SET_VRING_ADDR) are user addresses, descriptor addresses are guest-physical.
    """

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    mapping: memoryview = field(repr=False)


class GuestMemory:
    """The guest's RAM as shared by the front-end: bounds-checked reads and writes."""

    def __init__(self, regions: Sequence[Region]) -> None:
        """Check every region fits its mapping; overlaps are refused as ambiguous."""
        for region in regions:
            if region.size <= 0 or region.mmap_offset < 0:
                raise GuestMemoryError(f"memory region {region} is empty or negative")
            if region.mmap_offset + region.size > len(region.mapping):
                raise GuestMemoryError(
                    f"memory region at {region.guest_addr:#x} needs "
                    f"{region.mmap_offset + region.size} bytes, mapping has "
                    f"{len(region.mapping)}")
        ordered = sorted(regions, key=lambda r: r.guest_addr)
        for low, high in itertools.pairwise(ordered):
            if low.guest_addr + low.size > high.guest_addr:
                raise GuestMemoryError(f"memory regions at {low.guest_addr:#x} and "
                                       f"{high.guest_addr:#x} overlap")
        self.regions = tuple(ordered)

    def view(self, addr: int, length: int) -> memoryview:
        """The `length` bytes at guest-physical `addr`, as a window on the mapping."""
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"negative guest address {addr:#x} or length {length}")
        for region in self.regions:
            start = addr - region.guest_addr
            if 0 <= start < region.size or (length == 0 and start == region.size):
                if start + length > region.size:
                    raise GuestMemoryError(
                        f"guest range {addr:#x}+{length} runs past the end of its region")
                begin = region.mmap_offset + start
                return region.mapping[begin:begin + length]
        raise GuestMemoryError(f"guest address {addr:#x} is outside every memory region")

    def read(self, addr: int, length: int) -> bytes:
        """A copy of `length` bytes at `addr`."""
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Store `data` at `addr` (the region's mapping must be writable)."""
        target = self.view(addr, len(data))
        if target.readonly:
            raise GuestMemoryError(f"guest memory at {addr:#x} is mapped read-only")
        target[:] = data

    def user_to_guest(self, user_addr: int) -> int:
        """The guest-physical address of front-end virtual address `user_addr`."""
        for region in self.regions:
            if region.user_addr <= user_addr < region.user_addr + region.size:
                return region.guest_addr + (user_addr - region.user_addr)
        raise GuestMemoryError(f"user address {user_addr:#x} is outside every memory region")


@dataclass(frozen=True)
class Chain:
    """One popped descriptor chain: its head index and its buffers, in order."""

    head: int
    readable: tuple[memoryview, ...]
    writable: tuple[memoryview, ...]

    @property
    def readable_len(self) -> int:
        """Bytes the driver gave us to read."""
        return sum(len(b) for b in self.readable)

    @property
    def writable_len(self) -> int:
        """Bytes we may write back."""
        return sum(len(b) for b in self.writable)

    def read(self, limit: int) -> bytes:
        """The readable buffers concatenated, refusing more than `limit` bytes."""
        if self.readable_len > limit:
            raise VirtqueueError(f"chain {self.head} offers {self.readable_len} readable "
                                 f"bytes, more than {limit}")
        return b"".join(bytes(b) for b in self.readable)

    def write(self, data: bytes) -> int:
        """Scatter `data` over the writable buffers; returns the byte count written."""
        if len(data) > self.writable_len:
            raise VirtqueueError(f"chain {self.head} has room for {self.writable_len} bytes, "
                                 f"not {len(data)}")
        done = 0
        for buf in self.writable:
            n = min(len(buf), len(data) - done)
            buf[:n] = data[done:done + n]
            done += n
        return done


class Virtqueue:
    """The device side of one split virtqueue (addresses are guest-physical)."""

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, indirect: bool = False, last_avail_idx: int = 0) -> None:
        """Check the size and that the three rings lie wholly in guest memory."""
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.size = size
        self.indirect = indirect
        self.desc = memory.view(desc_addr, DESC_SIZE * size)
        self.avail = memory.view(avail_addr, 4 + 2 * size)
        self.used = memory.view(used_addr, 4 + USED_ELEM.size * size)
        if self.used.readonly:
            raise GuestMemoryError("the used ring is mapped read-only")
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # Our copy of used.idx: the driver never writes it, but reading it back would let a
        # buggy driver move our position; the vhost-user base (GET_VRING_BASE) is ours.
        self.used_idx = U16.unpack_from(self.used, 2)[0]

    def pending(self) -> int:
        """How many heads the driver has made available that we have not popped."""
        avail_idx: int = U16.unpack_from(self.avail, 2)[0]
        count = (avail_idx - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            raise RingIndexError(f"available idx {avail_idx} is {count} ahead of "
                                 f"{self.last_avail_idx}, queue size is {self.size}")
        return count

    def pop(self) -> Chain | None:
        """The next available chain, or None if the driver has offered nothing new."""
        if not self.pending():
            return None
        slot = self.last_avail_idx % self.size
        head: int = U16.unpack_from(self.avail, 4 + 2 * slot)[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def push(self, head: int, written: int) -> None:
        """Return chain `head` to the driver, saying we wrote `written` bytes into it."""
        if not 0 <= head < self.size:
            raise DescriptorIndexError(f"used id {head} is not below queue size {self.size}")
        slot = self.used_idx % self.size
        USED_ELEM.pack_into(self.used, 4 + USED_ELEM.size * slot, head, written & 0xFFFFFFFF)
        # The element is written before idx moves (on real shared memory the backend's
        # event loop must put a write barrier here; CPython's stores are in program order).
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.used, 2, self.used_idx)

    def _walk(self, head: int) -> Chain:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table, count, index = self.desc, self.size, head
        visited: set[int] = set()
        in_indirect = False
        while True:
            if not 0 <= index < count:
                raise DescriptorIndexError(f"descriptor {index} in chain {head} is not below "
                                           f"table size {count}")
            if index in visited:
                raise ChainLoopError(f"chain {head} visits descriptor {index} twice")
            visited.add(index)
            addr, length, flags, nxt = DESC.unpack_from(table, DESC_SIZE * index)
            if flags & F_INDIRECT:
                table, count = self._indirect_table(head, addr, length, flags, in_indirect)
                index, visited, in_indirect = 0, set(), True
                continue
            buf = self.memory.view(addr, length)
            if flags & F_WRITE:
                writable.append(buf)
            elif writable:
                raise DescriptorOrderError(f"chain {head}: readable descriptor {index} after "
                                           "a writable one")
            else:
                readable.append(buf)
            if len(readable) + len(writable) > self.size:
                raise ChainTooLongError(f"chain {head} is longer than queue size {self.size}")
            if not flags & F_NEXT:
                return Chain(head, tuple(readable), tuple(writable))
            index = nxt

    def _indirect_table(self, head: int, addr: int, length: int, flags: int,
                        nested: bool) -> tuple[memoryview, int]:
        if not self.indirect:
            raise IndirectError(f"chain {head} uses an indirect descriptor, which was not "
                                "negotiated (VIRTIO_RING_F_INDIRECT_DESC)")
        if nested:
            raise IndirectError(f"chain {head} nests an indirect table in another")
        if flags & F_NEXT:
            raise IndirectError(f"chain {head}: indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
            raise IndirectError(f"chain {head}: indirect table of {length} bytes is not 1 to "
                                f"{self.size} descriptors")
        return self.memory.view(addr, length), length // DESC_SIZE
