"""mount(8)-style option words split into mount(2) flags and filesystem data.

Both the host (container rootfs, shared volumes) and the guest (storages, container mounts)
turn option lists such as ``["ro", "nosuid", "lowerdir=/a:/b"]`` into a flags word and a
data string; this is the one table both use.
"""

from __future__ import annotations

from collections.abc import Iterable

# linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
# umount2(2)
MNT_DETACH = 0x2

#: Option word -> (bits it sets, bits it clears). Anything else is filesystem data.
FLAG_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "noatime": (MS_NOATIME, 0),
    "nodiratime": (MS_NODIRATIME, 0),
    "relatime": (MS_RELATIME, 0),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
    "defaults": (0, 0),
}


def parse_options(options: Iterable[str]) -> tuple[int, str]:
    """Split mount options into mount(2) flags and the comma-joined data string."""
    flags = 0
    data: list[str] = []
    for option in options:
        if option in FLAG_OPTIONS:
            set_bits, clear_bits = FLAG_OPTIONS[option]
            flags = (flags | set_bits) & ~clear_bits
        else:
            data.append(option)
    return flags, ",".join(data)
