"""A virtio-vsock guest driver over shared memory, for the device and back-end tests.

Guest RAM is a memfd: the code under test maps it through its own mapper (as the back-end
mmaps QEMU's fd), and `Guest` writes rings and packets through another mapping of the same
memfd, as a guest driver would. The layout (one region, two rings of `QSIZE`) is fixed here
so that the tests that play QEMU describe the same memory the guest writes.
"""

from __future__ import annotations

import mmap
import os
import struct

from hypervisors.vsock import packets
from hypervisors.vsock.device import RX, TX
from hypervisors.vsock.packets import HOST_CID, Op, Packet
from hypervisors.vsock.virtqueue import F_WRITE, GuestMemory, Region

CID = 3
GUEST_PORT = 1024
BASE = 0x4000_0000  # guest-physical
USER = 0x7F00_0000_0000  # QEMU's virtual address of the same memory
SIZE = 0x40000
QSIZE = 8
RINGS = {RX: (BASE + 0x0000, BASE + 0x1000, BASE + 0x2000),
         TX: (BASE + 0x3000, BASE + 0x4000, BASE + 0x5000)}
RX_BUFS, TX_BUFS, TX_BUF = BASE + 0x10000, BASE + 0x20000, 0x2000


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Guest:
    """A virtio-vsock driver: rx buffers and tx packets laid out in shared memory."""

    def __init__(self, memfd: int, rx_buf: int = 512) -> None:
        self.map = mmap.mmap(memfd, SIZE)
        self.memory = GuestMemory([Region(BASE, SIZE, USER, 0, memoryview(self.map))])
        self.rx_buf = rx_buf
        self.avail = {RX: 0, TX: 0}
        self.seen_used = {RX: 0, TX: 0}
        self.tx_next = 0
        for i in range(QSIZE):
            self.desc(RX, i, RX_BUFS + i * rx_buf, rx_buf, F_WRITE)
            self.offer(RX, i)

    def close(self) -> None:
        self.memory = GuestMemory([])
        self.map.close()

    def desc(self, q: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.memory.write(RINGS[q][0] + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, q: int, head: int) -> None:
        avail = RINGS[q][1]
        self.memory.write(avail + 4 + 2 * (self.avail[q] % QSIZE), struct.pack("<H", head))
        self.avail[q] = (self.avail[q] + 1) & 0xFFFF
        self.memory.write(avail + 2, struct.pack("<H", self.avail[q]))

    def used_idx(self, q: int) -> int:
        value: int = struct.unpack("<H", self.memory.read(RINGS[q][2] + 2, 2))[0]
        return value

    def send(self, packet: Packet | bytes) -> None:
        data = packets.build(packet) if isinstance(packet, Packet) else packet
        head = self.tx_next % QSIZE
        self.tx_next += 1
        self.memory.write(TX_BUFS + head * TX_BUF, data)
        self.desc(TX, head, TX_BUFS + head * TX_BUF, len(data))
        self.offer(TX, head)

    def receive(self, *, refill: bool = True) -> list[Packet]:
        """Packets the device put in rx buffers since last time (buffers re-offered)."""
        got = []
        used = RINGS[RX][2]
        while self.seen_used[RX] != self.used_idx(RX):
            slot = self.seen_used[RX] % QSIZE
            head, length = struct.unpack("<II", self.memory.read(used + 4 + 8 * slot, 8))
            got.append(packets.parse(self.memory.read(RX_BUFS + head * self.rx_buf, length)))
            self.seen_used[RX] = (self.seen_used[RX] + 1) & 0xFFFF
            if refill:
                self.offer(RX, head)
        return got


def to_host(op: Op, port: int, *, payload: bytes = b"", flags: int = 0,
            buf_alloc: int = 1 << 20, fwd_cnt: int = 0, src_port: int = GUEST_PORT) -> Packet:
    return Packet(CID, HOST_CID, src_port, port, op, flags=flags, buf_alloc=buf_alloc,
                  fwd_cnt=fwd_cnt, payload=payload)
