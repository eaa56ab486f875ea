"""The split virtqueue against rings laid out by hand in a bytearray (the "guest memory")."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisors.vsock.errors import GuestMemoryError, VirtqueueError, VsockError
from hypervisors.vsock.virtqueue import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    ChainLoopError,
    ChainTooLongError,
    DescriptorIndexError,
    DescriptorOrderError,
    GuestMemory,
    IndirectError,
    Region,
    RingIndexError,
    Virtqueue,
)

BASE = 0x4000_0000  # guest-physical start of the region
USER = 0x7F00_0000_0000  # the front-end's virtual address of the same bytes
OFFSET = 0x200  # the region starts this far into the mapping
SIZE = 0x10000
DESC, AVAIL, USED, DATA = BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x4000


class Guest:
    """A driver: writes descriptors and available entries, reads used entries."""

    def __init__(self, qsize: int = 8, *, indirect: bool = False) -> None:
        self.raw = bytearray(OFFSET + SIZE)
        self.memory = GuestMemory([Region(BASE, SIZE, USER, OFFSET, memoryview(self.raw))])
        self.qsize = qsize
        self.avail_idx = 0
        self.queue = Virtqueue(self.memory, qsize, DESC, AVAIL, USED, indirect=indirect)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC) -> None:
        self.memory.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        self.memory.write(AVAIL + 4 + 2 * (self.avail_idx % self.qsize),
                          struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack("<H", self.memory.read(USED + 2, 2))[0]
        elems = [struct.unpack("<II", self.memory.read(USED + 4 + 8 * i, 8))
                 for i in range(self.qsize)]
        return idx, elems


def test_pop_reads_a_chain_and_push_publishes_it() -> None:
    g = Guest()
    g.memory.write(DATA, b"header")
    g.memory.write(DATA + 0x100, b"payload")
    g.desc(0, DATA, 6, F_NEXT, 3)
    g.desc(3, DATA + 0x100, 7, F_NEXT, 5)
    g.desc(5, DATA + 0x200, 16, F_WRITE)
    assert g.queue.pop() is None
    g.offer(0)
    assert g.queue.pending() == 1
    chain = g.queue.pop()
    assert chain is not None and chain.head == 0
    assert chain.read(limit=13) == b"headerpayload"
    assert chain.writable_len == 16
    assert chain.write(b"reply") == 5
    assert g.memory.read(DATA + 0x200, 5) == b"reply"
    # The bytes really are in the caller's buffer, at the region's mmap offset.
    assert g.raw[OFFSET + 0x4200:OFFSET + 0x4205] == b"reply"
    assert g.queue.pop() is None
    g.queue.push(chain.head, 5)
    idx, elems = g.used()
    assert idx == 1 and elems[0] == (0, 5)


def test_chain_read_refuses_more_than_the_limit() -> None:
    g = Guest()
    g.desc(0, DATA, 100)
    g.offer(0)
    chain = g.queue.pop()
    assert chain is not None
    with pytest.raises(VirtqueueError, match="more than 44"):
        chain.read(limit=44)
    with pytest.raises(VirtqueueError, match="room for 0"):
        chain.write(b"x")


def test_indices_wrap_from_65535_to_0() -> None:
    raw = bytearray(OFFSET + SIZE)
    memory = GuestMemory([Region(BASE, SIZE, USER, OFFSET, memoryview(raw))])
    memory.write(USED + 2, struct.pack("<H", 65534))  # the driver's used idx so far
    queue = Virtqueue(memory, 4, DESC, AVAIL, USED, last_avail_idx=65534)
    for i in range(4):
        memory.write(DESC + 16 * i, struct.pack("<QIHH", DATA + i, 1, 0, 0))
    # Heads 0..3 offered at avail idx 65534, 65535, 0, 1 (slots 2, 3, 0, 1).
    for n, slot in enumerate((2, 3, 0, 1)):
        memory.write(AVAIL + 4 + 2 * slot, struct.pack("<H", n))
    memory.write(AVAIL + 2, struct.pack("<H", 2))
    assert queue.pending() == 4
    heads = []
    while (chain := queue.pop()) is not None:
        heads.append(chain.head)
        queue.push(chain.head, 0)
    assert heads == [0, 1, 2, 3]
    assert queue.last_avail_idx == 2
    assert struct.unpack("<H", memory.read(USED + 2, 2))[0] == 2
    # Used elements landed in slots 65534 % 4 = 2, 3, then 0, 1.
    assert [struct.unpack("<I", memory.read(USED + 4 + 8 * s, 4))[0] for s in range(4)] == \
        [2, 3, 0, 1]


def test_available_idx_more_than_a_queue_ahead_is_refused() -> None:
    g = Guest(qsize=4)
    g.memory.write(AVAIL + 2, struct.pack("<H", 5))
    with pytest.raises(RingIndexError):
        g.queue.pop()


def test_a_loop_is_refused() -> None:
    g = Guest()
    g.desc(0, DATA, 1, F_NEXT, 1)
    g.desc(1, DATA, 1, F_NEXT, 0)
    g.offer(0)
    with pytest.raises(ChainLoopError):
        g.queue.pop()


def test_a_self_loop_is_refused() -> None:
    g = Guest()
    g.desc(2, DATA, 1, F_NEXT, 2)
    g.offer(2)
    with pytest.raises(ChainLoopError):
        g.queue.pop()


@pytest.mark.parametrize("head, nxt", [(8, 0), (0, 8), (0, 0xFFFF)])
def test_descriptor_index_beyond_the_queue_is_refused(head: int, nxt: int) -> None:
    g = Guest()
    g.desc(0, DATA, 1, F_NEXT, nxt)
    g.offer(head)
    with pytest.raises(DescriptorIndexError):
        g.queue.pop()


@pytest.mark.parametrize("addr, length", [
    (0, 1),                      # below the region
    (BASE + SIZE, 1),            # just past it
    (BASE + SIZE - 4, 8),        # straddles the end
    (DATA, 0xFFFFFFFF),          # huge length
    (0xFFFF_FFFF_FFFF_FFF0, 16),  # top of the address space
])
def test_a_buffer_outside_guest_memory_is_refused(addr: int, length: int) -> None:
    g = Guest()
    g.desc(0, addr, length)
    g.offer(0)
    with pytest.raises(GuestMemoryError):
        g.queue.pop()


def test_a_readable_buffer_after_a_writable_one_is_refused() -> None:
    g = Guest()
    g.desc(0, DATA, 4, F_WRITE | F_NEXT, 1)
    g.desc(1, DATA + 8, 4)
    g.offer(0)
    with pytest.raises(DescriptorOrderError):
        g.queue.pop()


def test_indirect_is_refused_when_not_negotiated() -> None:
    g = Guest()
    g.desc(0, DATA, 32, F_INDIRECT)
    g.offer(0)
    with pytest.raises(IndirectError, match="not negotiated"):
        g.queue.pop()


def test_an_indirect_table_is_followed_when_negotiated() -> None:
    g = Guest(indirect=True)
    table = DATA + 0x1000
    g.memory.write(DATA, b"abcd")
    g.desc(0, DATA, 4, F_NEXT, 1, table=table)
    g.desc(1, DATA + 0x10, 8, F_WRITE, table=table)
    g.desc(0, table, 32, F_INDIRECT)
    g.offer(0)
    chain = g.queue.pop()
    assert chain is not None
    assert chain.read(4) == b"abcd" and chain.writable_len == 8


@pytest.mark.parametrize("length, flags", [
    (0, F_INDIRECT), (24, F_INDIRECT), (16 * 9, F_INDIRECT), (32, F_INDIRECT | F_NEXT)])
def test_a_malformed_indirect_descriptor_is_refused(length: int, flags: int) -> None:
    g = Guest(indirect=True)
    g.desc(0, DATA + 0x1000, length, flags, 1)
    g.desc(1, DATA, 1)
    g.offer(0)
    with pytest.raises(IndirectError):
        g.queue.pop()


def test_nested_indirect_and_loops_in_an_indirect_table_are_refused() -> None:
    g = Guest(indirect=True)
    table = DATA + 0x1000
    g.desc(0, table, 16, F_INDIRECT, table=table)
    g.desc(0, table, 16, F_INDIRECT)
    g.offer(0)
    with pytest.raises(IndirectError, match="nests"):
        g.queue.pop()
    g = Guest(indirect=True)  # after an error the device is reset: start again
    g.desc(0, DATA, 1, F_NEXT, 1, table=table)
    g.desc(1, DATA, 1, F_NEXT, 0, table=table)
    g.desc(1, table, 32, F_INDIRECT)
    g.offer(1)
    with pytest.raises(ChainLoopError):
        g.queue.pop()


def test_a_chain_longer_than_the_queue_is_refused() -> None:
    g = Guest(qsize=4, indirect=True)
    table = DATA + 0x1000
    for i in range(4):
        g.desc(i, DATA, 1, F_NEXT if i < 3 else 0, i + 1, table=table)
    g.desc(0, DATA, 1, F_NEXT, 1)
    g.desc(1, table, 64, F_INDIRECT)  # 1 direct + 4 indirect = 5 > 4
    g.offer(0)
    with pytest.raises(ChainTooLongError):
        g.queue.pop()


def test_push_refuses_a_head_beyond_the_queue() -> None:
    with pytest.raises(DescriptorIndexError):
        Guest().queue.push(8, 0)


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_queue_size_must_be_a_power_of_two(size: int) -> None:
    memory = GuestMemory([Region(BASE, SIZE, USER, 0, memoryview(bytearray(SIZE)))])
    with pytest.raises(VirtqueueError):
        Virtqueue(memory, size, DESC, AVAIL, USED)


def test_rings_must_lie_in_guest_memory() -> None:
    memory = GuestMemory([Region(BASE, SIZE, USER, 0, memoryview(bytearray(SIZE)))])
    with pytest.raises(GuestMemoryError):
        Virtqueue(memory, 256, BASE + SIZE - 16, AVAIL, USED)


def test_guest_memory_checks_regions_and_translates_user_addresses() -> None:
    buf = memoryview(bytearray(0x3000))
    memory = GuestMemory([Region(0x1000, 0x1000, 0xA000, 0, buf),
                          Region(0x8000, 0x1000, 0xB000, 0x1000, buf)])
    assert memory.user_to_guest(0xB010) == 0x8010
    with pytest.raises(GuestMemoryError):
        memory.user_to_guest(0xC000)
    memory.write(0x8000, b"x")
    assert buf[0x1000:0x1001] == b"x"
    with pytest.raises(GuestMemoryError, match="needs"):
        GuestMemory([Region(0, 0x2000, 0, 0x2000, buf)])
    with pytest.raises(GuestMemoryError, match="overlap"):
        GuestMemory([Region(0, 0x1000, 0, 0, buf), Region(0x800, 0x1000, 0, 0, buf)])
    with pytest.raises(GuestMemoryError, match="read-only"):
        GuestMemory([Region(0, 0x1000, 0, 0, memoryview(bytes(0x1000)))]).write(0, b"x")


DESCRIPTORS = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.builds(lambda a, n, f, x: struct.pack("<QIHH", a, n, f, x),
              st.sampled_from([DATA, DATA + 0x1000, BASE + SIZE - 8, 0]),
              st.integers(0, 64), st.integers(0, 7), st.integers(0, 9)))


@settings(max_examples=500, deadline=None)
@given(table=st.lists(DESCRIPTORS, min_size=8, max_size=8).map(b"".join),
       heads=st.lists(st.integers(0, 9), min_size=8, max_size=8).map(
           lambda h: struct.pack("<8H", *h)),
       avail_idx=st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),
       indirect=st.booleans())
def test_arbitrary_rings_never_raise_anything_but_vsock_errors(
        table: bytes, heads: bytes, avail_idx: int, indirect: bool) -> None:
    g = Guest(indirect=indirect)
    g.memory.write(DESC, table)
    g.memory.write(AVAIL + 2, struct.pack("<H", avail_idx) + heads)
    popped = 0
    try:
        while (chain := g.queue.pop()) is not None:
            popped += 1
            g.queue.push(chain.head, chain.writable_len)
    except VsockError:
        return
    # Without an error, exactly what the driver offered came out, and was published.
    assert popped == avail_idx
    assert g.used()[0] == avail_idx


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.booleans()), min_size=1, max_size=8))
def test_valid_chains_come_back_as_built(spec: list[tuple[int, bool]]) -> None:
    g = Guest()
    spec = sorted(spec, key=lambda s: s[1])  # readable first, as the spec requires
    for i, (length, write) in enumerate(spec):
        g.desc(i, DATA + 0x100 * i, length, (F_WRITE if write else 0) |
               (F_NEXT if i + 1 < len(spec) else 0), i + 1)
    g.offer(0)
    chain = g.queue.pop()
    assert chain is not None
    assert [len(b) for b in chain.readable] == [n for n, w in spec if not w]
    assert [len(b) for b in chain.writable] == [n for n, w in spec if w]
