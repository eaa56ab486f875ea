"""The one table of timeouts used by the hypervisors layer (seconds).

Rule: every socket connect, QMP command and process wait in this package takes its deadline
from `TIMEOUTS` (or from an explicit argument whose default comes from here). Nothing waits
without a deadline. Values are sized for TCG guests on slow CI machines, where QEMU itself
starts in well under a second but the host may be loaded.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """Deadlines, in seconds, for each kind of wait."""

    #: From spawning QEMU until its QMP socket accepts and the capabilities handshake is done.
    qmp_connect: float = 30.0
    #: One QMP command and its response.
    qmp_command: float = 10.0
    #: After QMP ``quit``: how long QEMU may take to exit before it gets SIGKILL.
    qemu_quit: float = 5.0
    #: After SIGKILL: how long until the process is gone (reaped, or at least a zombie).
    kill_wait: float = 5.0
    #: From spawning virtiofsd until its vhost-user socket exists.
    virtiofsd_socket: float = 10.0
    #: After SIGTERM to virtiofsd: how long before it gets SIGKILL.
    virtiofsd_stop: float = 3.0
    #: Under TCG, how long a cold boot waits for a host-wide boot slot before it boots
    #: anyway (a boot that never reaches its agent holds its slot until the start fails).
    boot_slot: float = 60.0
    #: Poll interval while waiting for a boot slot.
    boot_slot_poll: float = 0.05
    #: Poll interval while waiting for a socket file or a process to go.
    poll_interval: float = 0.02


#: The table. Tests may build their own `Timeouts(...)`; production code reads this one.
TIMEOUTS = Timeouts()
