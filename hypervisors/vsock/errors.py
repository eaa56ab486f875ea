"""Errors of the vsock cores.

Every error raised on input from QEMU, the guest or a host client is a `VsockError`, so a
caller can turn any of them into "reset the device / drop the connection" with one
``except``. The subclasses say which layer refused the input.
"""

from __future__ import annotations

from hypervisors.errors import HypervisorError


class VsockError(HypervisorError):
    """Input that the vsock cores refuse; the caller resets the device or connection."""


class VhostUserError(VsockError):
    """QEMU (the vhost-user front-end) sent a message that is not valid here."""


class GuestMemoryError(VsockError):
    """A guest address or length falls outside the memory the front-end shared."""


class VirtqueueError(VsockError):
    """The driver put something on a virtqueue that breaks the split-ring rules."""


class PacketError(VsockError):
    """A virtio-vsock packet is malformed (length, type or op)."""


class ConnectionStateError(VsockError):
    """The local side used a vsock connection wrongly (e.g. send before connected)."""


class HandshakeError(VsockError):
    """A hybrid-vsock client sent something other than ``CONNECT <port>\\n``."""


class CapacityError(VsockError):
    """A bound was reached (too many streams); the host client is refused."""
