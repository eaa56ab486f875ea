"""Sandbox storages: filesystems the host asks the guest to mount (virtio-fs, 9p, local).

Theory of operation
-------------------
CreateSandbox carries ``Storage`` entries; each becomes one mount(2) at a mount point that
must stay under the agent's run dir. Mounts are recorded in order and undone in reverse on
DestroySandbox. The mount function is injected so that unit tests need no root and no
virtio device. mount(2) of an already-present virtio-fs is a fast syscall, so it runs
inline rather than through a thread (a thread pool costs imports and start-up under TCG).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from agent import syscalls, validate
from agent.errors import InvalidArgument

MountFn = Callable[[str, str, str, int, str], None]
UmountFn = Callable[[str, int], None]

# driver -> (fstype, default options)
_DRIVERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "virtio-fs": ("virtiofs", ()),
    "9p": ("9p", ("trans=virtio", "version=9p2000.L", "msize=512000")),
    "local": ("tmpfs", ("mode=0777",)),
}


class StorageRequest(NamedTuple):  # not a dataclass: see agent.crun.CrunConfig
    driver: str
    source: str
    fstype: str
    options: tuple[str, ...]
    mount_point: str


class Storages:
    def __init__(self, run_dir: str, mount: MountFn = syscalls.mount,
                 umount: UmountFn = syscalls.umount) -> None:
        self._run_dir = run_dir
        self._mount = mount
        self._umount = umount
        self.mounted: list[str] = []

    def add(self, req: StorageRequest) -> str:
        """Mount one storage; returns its (normalised) mount point."""
        target = validate.check_guest_path("storage mount_point", req.mount_point, self._run_dir)
        if req.driver not in _DRIVERS:
            raise InvalidArgument(f"unsupported storage driver {req.driver!r}")
        if not req.source or "\0" in req.source:
            raise InvalidArgument("storage source must be a non-empty string")
        fstype, defaults = _DRIVERS[req.driver]
        if req.fstype not in ("", fstype):
            raise InvalidArgument(f"storage driver {req.driver} mounts {fstype}, not {req.fstype}")
        flags, data = syscalls.parse_mount_options((*defaults, *req.options))
        if flags & syscalls.MS_BIND:
            raise InvalidArgument("bind mounts are not a storage")
        os.makedirs(target, mode=0o755, exist_ok=True)
        try:
            self._mount(req.source, target, fstype, flags, data)
        except OSError as exc:
            raise InvalidArgument(f"mount {req.driver} {req.source} on {target}: {exc}") from exc
        self.mounted.append(target)
        return target

    def remove_all(self) -> list[str]:
        """Unmount in reverse order; returns the errors (teardown goes on regardless)."""
        errors: list[str] = []
        while self.mounted:
            target = self.mounted.pop()
            try:
                self._umount(target, syscalls.MNT_DETACH)
            except OSError as exc:
                errors.append(f"umount {target}: {exc}")
        return errors
