"""Sandbox storages: filesystems the host asks the guest to mount (virtio-fs, 9p, local).

Theory of operation
-------------------
CreateSandbox carries ``Storage`` entries; each becomes one mount(2) at a mount point that
must stay under the agent's run dir. Mounts are recorded in order and undone in reverse on
DestroySandbox. The mount function is injected so that unit tests need no root and no
virtio device. mount(2) of an already-present virtio-fs is a fast syscall, so it runs
inline rather than through a thread (a thread pool costs imports and start-up under TCG).

A virtio-fs share may be hot-plugged just before CreateSandbox (a VM restored from a
template gets its share then), so the guest may not have probed the device yet: the kernel
then refuses the unknown tag with EINVAL (fs/fuse/virtio_fs.c, virtio_fs_get_tree: "tag <%s>
not found"), or ENOENT. Such a mount is retried with short sleeps for about
``VIRTIOFS_WAIT_SECONDS``; the sleeps are asyncio's, so other calls flow meanwhile. Every
other driver and every other error fails at once.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import NamedTuple

from agent import syscalls, validate
from agent.errors import InvalidArgument
from agent.init import warn

MountFn = Callable[[str, str, str, int, str], None]
UmountFn = Callable[[str, int], None]
SleepFn = Callable[[float], Awaitable[None]]

VIRTIOFS_WAIT_SECONDS = 10.0  # a hot-plugged device is probed well within this under TCG
_FIRST_SLEEP, _MAX_SLEEP = 0.05, 0.5
# What mount(2) says while the virtio-fs device carrying the tag is not there yet.
_TAG_NOT_YET = frozenset({errno.EINVAL, errno.ENOENT})

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
                 umount: UmountFn = syscalls.umount, sleep: SleepFn = asyncio.sleep,
                 virtiofs_wait: float = VIRTIOFS_WAIT_SECONDS) -> None:
        self._run_dir = run_dir
        self._mount = mount
        self._umount = umount
        self._sleep = sleep
        self._virtiofs_wait = virtiofs_wait
        self.mounted: list[str] = []

    async def add(self, req: StorageRequest) -> str:
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
        what = f"mount {req.driver} {req.source} on {target}"
        try:
            if req.driver == "virtio-fs":
                await self._mount_when_probed(req.source, target, fstype, flags, data)
            else:
                self._mount(req.source, target, fstype, flags, data)
        except OSError as exc:
            raise InvalidArgument(f"{what}: {exc}") from exc
        except _GaveUp as exc:
            raise InvalidArgument(
                f"{what}: {exc.last} (still failing after {exc.waited:.1f}s: no virtio-fs "
                f"device with tag {req.source!r} appeared)") from exc.last
        self.mounted.append(target)
        return target

    async def _mount_when_probed(self, source: str, target: str, fstype: str, flags: int,
                                 data: str) -> None:
        """mount(2), retried while the tag may belong to a device still being probed."""
        waited = 0.0
        for tries, delay in enumerate(_delays(self._virtiofs_wait), start=1):
            try:
                self._mount(source, target, fstype, flags, data)
            except OSError as exc:
                if exc.errno not in _TAG_NOT_YET:
                    raise
                if delay is None:
                    raise _GaveUp(waited, exc) from exc
                if tries == 1:
                    warn(f"virtio-fs tag {source!r} not there yet ({exc.strerror}): waiting "
                         f"up to {self._virtiofs_wait:.0f}s for the device")
                await self._sleep(delay)
                waited += delay
                continue
            if tries > 1:
                warn(f"virtio-fs tag {source!r} mounted after {tries} tries ({waited:.2f}s)")
            return

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


class _GaveUp(Exception):
    """The retries ran out after ``waited`` seconds; ``last`` is mount(2)'s last error."""

    def __init__(self, waited: float, last: OSError) -> None:
        super().__init__(waited, last)
        self.waited = waited
        self.last = last


def _delays(total: float) -> Iterator[float | None]:
    """Sleeps between tries: 50 ms doubling to 0.5 s, summing to ``total``; then None
    (the last try)."""
    left, delay = total, _FIRST_SLEEP
    while left > 1e-9:
        step = min(delay, left)
        yield step
        left -= step
        delay = min(delay * 2, _MAX_SLEEP)
    yield None
