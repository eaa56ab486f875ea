"""Tap queue fds: ``/dev/net/tun`` with TUNSETIFF (tcfilter), ``/dev/tap<ifindex>``
(macvtap). A tun fd belongs to the netns it was opened in: open them inside the pod's."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct

TUNSETIFF, TUNGETIFF = 0x400454CA, 0x800454D2
IFREQ_SIZE = 40
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000


def open_tap_queues(name: str, queues: int) -> tuple[int, ...]:
    """Create (or attach to) tap ``name`` with ``queues`` queues; the fds, close-on-exec
    (the VMM gets them through pass_fds). The tap goes away with its last fd."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE
    request = struct.pack("16sH", name.encode(), flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError:
        close_all(fds)
        raise
    return tuple(fds)


def open_macvtap_queues(ifindex: int, name: str, queues: int) -> tuple[int, ...]:
    """The char device of macvtap ``ifindex`` opened ``queues`` times; OSError unless the
    device is the macvtap called ``name`` (TUNGETIFF tells)."""
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open(f"/dev/tap{ifindex}", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            found = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_SIZE))[:16].split(b"\0", 1)[0]
            if found != name.encode():
                raise OSError(errno.ENODEV, f"/dev/tap{ifindex} is {found.decode()!r}, "
                              f"not our macvtap {name}")
    except OSError:
        close_all(fds)
        raise
    return tuple(fds)


def close_all(fds: tuple[int, ...] | list[int]) -> None:
    """Close fds we own, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
