"""Which agent channel a VM gets, and why: one decision shared by the runtime and `check`.

* ``kernel``: virtio-vsock through the host kernel (``vhost-vsock-pci``, `/dev/vhost-vsock`);
  the host dials ``AF_VSOCK`` with the guest's CID. Every KVM host our users run has it.
* ``vhost-user``: virtio-vsock through our own back-end process (``vhost-user-vsock-pci``,
  `hypervisors.vsock.backend`); the host dials its hybrid unix socket. Runs anywhere QEMU
  has that device, and the VM's RAM is then shared memory.
* ``serial``: a virtio-serial port; the fallback of last resort (``use_vsock = false``).

``vsock_backend = "auto"`` takes the kernel where `/dev/vhost-vsock` exists, else
`AUTO_WITHOUT_KERNEL` (decided by measurement: docs/performance.md, "Agent channel").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

VSOCK_BACKENDS = ("auto", "kernel", "vhost-user")
VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"


class Channel(enum.Enum):
    """How the host reaches the guest agent."""

    KERNEL_VSOCK = "kernel"
    VHOST_USER_VSOCK = "vhost-user"
    SERIAL = "serial"


#: What ``auto`` picks on a host without `/dev/vhost-vsock`: virtio-serial, by measurement
#: (`benchmarks.agent_channel -n 3`, docs/performance.md "Agent channel"): under TCG an
#: agent round trip through our back-end took 3.94 ms against 3.52 ms (p95 6.11 against
#: 4.84), a container's stdout streamed at 1.78 against 2.86 MiB/s, its stdin at 2.05
#: against 1.76 MiB/s, and an exec took the same 0.8 s.
AUTO_WITHOUT_KERNEL = Channel.SERIAL


@dataclass(frozen=True)
class ChannelChoice:
    """The channel, and the reason in words (for the start-up log and `kata-runtime check`)."""

    channel: Channel
    reason: str


class ChannelError(ValueError):
    """The configuration asks for a channel this host cannot give."""


def choose_channel(use_vsock: bool, backend: str, has_vhost_vsock: bool,
                   templates: bool = False) -> ChannelChoice:
    """The agent channel for ``use_vsock``/``vsock_backend`` on a host that has (or not)
    `/dev/vhost-vsock`, for a VM that is (or comes from) a VM template or not;
    `ChannelError` when ``vsock_backend = "kernel"`` cannot be met."""
    if backend not in VSOCK_BACKENDS:
        raise ChannelError(f'vsock_backend = "{backend}" is not one of {", ".join(VSOCK_BACKENDS)}')
    if not use_vsock:
        return ChannelChoice(Channel.SERIAL, "use_vsock = false: virtio-serial")
    present = f"{VHOST_VSOCK_DEVICE} present"
    absent = f"{VHOST_VSOCK_DEVICE} absent"
    if backend == "kernel":
        if not has_vhost_vsock:
            raise ChannelError(
                f'vsock_backend = "kernel" but {absent}: run "modprobe vhost_vsock", or set '
                'vsock_backend = "vhost-user" (vsock through our own back-end) or "auto"')
        return ChannelChoice(Channel.KERNEL_VSOCK, f"{present}: kernel vsock (vhost-vsock)")
    if backend == "vhost-user":
        return ChannelChoice(Channel.VHOST_USER_VSOCK,
                             'vsock_backend = "vhost-user": vsock through our back-end')
    if has_vhost_vsock:
        return ChannelChoice(Channel.KERNEL_VSOCK, f"{present}: kernel vsock (vhost-vsock)")
    if templates:  # a vhost-user device's state is not in a saved VM (docs/vsock.md)
        return ChannelChoice(Channel.SERIAL, f"{absent} and VM templates on: virtio-serial")
    if AUTO_WITHOUT_KERNEL is Channel.VHOST_USER_VSOCK:
        return ChannelChoice(Channel.VHOST_USER_VSOCK,
                             f"{absent}: vsock through our vhost-user back-end")
    return ChannelChoice(Channel.SERIAL, f"{absent}: virtio-serial")
