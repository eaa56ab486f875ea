"""The pod's cgroup on the host: where a sandbox's VMM, virtiofsd and shim are accounted.

The kubelet makes each pod a cgroup (CRI's ``cgroup_parent``, sized from the pod's limits
plus the RuntimeClass overhead) and the pause container's ``linux.cgroupsPath`` names a
child of it. Like Kata's ``sandbox_cgroup_only``, the processes that run the pod go into
that child, so the node's accounting and eviction (and CRI's PodSandboxStats) see what the
pod really costs.

Works on cgroup v2 (one unified hierarchy) and v1 (the cpu, cpuacct, memory and pids
hierarchies, wherever they are mounted). ``cgroupfs``-style paths (``/a/b/c``) are used as
they are; a systemd-style one (``slice:prefix:name``, the kubelet's systemd driver) becomes
the directory systemd gives that unit, made directly in cgroupfs (no D-Bus: systemd does
not know the scope, but the accounting is the pod slice's). The directory is made only
where its parent exists: we never make the pod's cgroup, the kubelet does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import time
from dataclasses import dataclass, field

V1_CONTROLLERS = frozenset({"cpu", "cpuacct", "memory", "pids"})
MOUNTINFO = "/proc/self/mountinfo"
RMDIR_TRIES = 50  # x 0.1 s: a killed process leaves its cgroup a moment later


@dataclass(frozen=True)
class Hierarchy:
    mount_point: str
    v2: bool


def hierarchies(mountinfo: str) -> list[Hierarchy]:
    """The cgroup hierarchies a pod's cost goes into, from /proc/self/mountinfo text:
    the v2 one when ``/sys/fs/cgroup`` is cgroup2, else the v1 ones of V1_CONTROLLERS."""
    found: list[Hierarchy] = []
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(extra) < 3:
            continue
        mount_point, fstype, options = fields[4], extra[0], extra[2].split(",")
        if fstype == "cgroup2" and mount_point == "/sys/fs/cgroup":
            return [Hierarchy(mount_point, v2=True)]
        if fstype == "cgroup" and V1_CONTROLLERS & set(options):
            found.append(Hierarchy(mount_point, v2=False))
    return found


_UNIT = re.compile(r"[A-Za-z0-9_.@\\-]+")


def systemd_path(cgroups_path: str) -> str | None:
    """The cgroupfs directory of a systemd-style ``slice:prefix:name`` (as CRI writes it for
    a kubelet with the systemd driver): ``a-b-c.slice`` lives in
    ``/a.slice/a-b.slice/a-b-c.slice``, and the unit is ``<prefix>-<name>.scope``."""
    parts = cgroups_path.split(":")
    if len(parts) != 3 or not all(_UNIT.fullmatch(p) for p in parts):
        return None
    slice_name, prefix, name = parts
    if not slice_name.endswith(".slice") or ".." in slice_name:
        return None
    words = slice_name.removesuffix(".slice").split("-")
    if not all(words):
        return None
    nested = "".join("/" + "-".join(words[:i]) + ".slice" for i in range(1, len(words) + 1))
    return f"{nested}/{prefix}-{name}.scope"


def checked_path(cgroups_path: str) -> str | None:
    """The cgroupfs path to use for a ``cgroupsPath``: a cgroupfs-style one (absolute,
    normalised, no ``..``) as it is, a systemd-style one converted; else None."""
    if ":" in cgroups_path:
        return systemd_path(cgroups_path)
    if (not cgroups_path.startswith("/") or posixpath.normpath(cgroups_path) != cgroups_path
            or cgroups_path == "/"):
        return None
    return cgroups_path


def own_cgroups(proc_cgroup: str, found: list[Hierarchy]) -> dict[str, str]:
    """mount point -> this process's cgroup directory there, from /proc/self/cgroup text."""
    places: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        names = set(controllers.split(","))
        for h in found:
            mine = (controllers == "") if h.v2 else os.path.basename(h.mount_point) in names
            if mine:
                places[h.mount_point] = h.mount_point + path.rstrip("/")
    return places


@dataclass(frozen=True)
class HostCgroup:
    """One cgroup, as a directory in each hierarchy where it was made."""

    dirs: tuple[str, ...]
    #: The hierarchies it was made in (so joining needs no second look at mountinfo).
    hierarchies: tuple[Hierarchy, ...] = ()
    #: Where this process was before `join_self` (it goes back there before `remove`).
    origins: dict[str, str] = field(default_factory=dict)

    def join_self(self) -> None:
        """Move this process in too, remembering where it came from."""
        with open("/proc/self/cgroup") as f:
            places = own_cgroups(f.read(), list(self.hierarchies))
        for d in self.dirs:
            mount = next((m for m in places if d.startswith(m + "/")), None)
            if mount is not None:
                self.origins[d] = places[mount]
                _write(os.path.join(d, "cgroup.procs"), str(os.getpid()))

    @classmethod
    def make(cls, cgroups_path: str, found: list[Hierarchy]) -> HostCgroup:
        """Make the cgroup under every hierarchy where its parent exists."""
        made = []
        for h in found:
            target = h.mount_point + cgroups_path
            if not os.path.isdir(os.path.dirname(target)):
                continue  # no pod cgroup there: not ours to make
            with contextlib.suppress(FileExistsError):
                os.mkdir(target, 0o755)
            charge = os.path.join(target, "memory.move_charge_at_immigrate")
            if not h.v2 and os.path.exists(charge):
                # v1 memory: a process's pages follow it into the cgroup (QEMU moves in
                # after it started).
                with contextlib.suppress(OSError):
                    _write(charge, "3")
            made.append(target)
        return cls(tuple(made), tuple(found))

    def add(self, pid: int) -> None:
        """Move a process (all its threads) and its children into the cgroup (virtiofsd
        forks its serving process before it could be moved)."""
        for p in (pid, *children(pid)):
            for d in self.dirs:
                with contextlib.suppress(ProcessLookupError):  # a child that just exited
                    _write(os.path.join(d, "cgroup.procs"), str(p))

    def remove(self) -> None:
        """Leave it (if `join_self` moved us in), then remove it once its processes are
        gone (best effort, bounded)."""
        for origin in self.origins.values():
            with contextlib.suppress(OSError):
                _write(os.path.join(origin, "cgroup.procs"), str(os.getpid()))
        for d in self.dirs:
            remove_dir(d)


def children(pid: int) -> list[int]:
    """Child processes of ``pid`` (/proc/<pid>/task/*/children), recursively."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            found += [kid, *children(kid)]
    return found


def remove_dir(path: str) -> None:
    for _ in range(RMDIR_TRIES):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                return
            time.sleep(0.1)


def read_mountinfo() -> str:
    with open(MOUNTINFO) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
