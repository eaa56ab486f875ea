"""Guest CIDs for kernel vsock, reserved without collisions between concurrent sandboxes.

A CID is host-wide in the kernel's vhost-vsock. Instead of picking one at random and letting
QEMU fail on a collision, the shim opens `/dev/vhost-vsock` itself and claims a CID on that
instance with ``VHOST_VSOCK_SET_GUEST_CID`` (the kernel answers ``EADDRINUSE`` when another
instance holds it, and we try another); QEMU then gets that open instance as the device's
``vhostfd``, so the CID stays ours from the claim to the VM's end. (Kata does the same.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct
from collections.abc import Callable

from hypervisors.errors import HypervisorError

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
#: _IOW(VHOST_VIRTIO = 0xAF, 0x60, __u64), linux/vhost.h.
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60
#: 0-2 are reserved (hypervisor, local, host); we stay below 2^31.
FIRST_CID, LAST_CID = 3, 2**31 - 1
MAX_TRIES = 64

Ioctl = Callable[[int, int, bytes], object]


def reserve_guest_cid(device: str = VHOST_VSOCK_DEVICE, ioctl: Ioctl = fcntl.ioctl,
                      rng: random.Random | None = None) -> tuple[int, int]:
    """(cid, fd): a vhost-vsock instance that holds a free CID; the fd is the caller's, to
    hand to QEMU (``vhostfd``) and close once QEMU has its copy."""
    pick = rng or random.SystemRandom()
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise HypervisorError(f"failed to open {device} for a guest CID: {e.strerror}; "
                              "modprobe vhost_vsock, or set use_vsock = false") from e
    try:
        for _ in range(MAX_TRIES):
            cid = pick.randint(FIRST_CID, LAST_CID)
            try:
                ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise HypervisorError(f"failed to claim guest CID {cid} on {device}: "
                                          f"{e.strerror}") from e
                continue
            return cid, fd
        raise HypervisorError(f"failed to find a free guest CID on {device} in {MAX_TRIES} "
                              "tries")
    except BaseException:
        os.close(fd)
        raise
