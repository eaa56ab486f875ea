"""PID-1 duties in the guest: the mounts, modules and device links busybox /init left out.

Theory of operation
-------------------
busybox ``/init`` mounts /proc, /sys and /dev (devtmpfs) and execs the agent. Everything
else a container host needs is done here with direct syscalls (no fork: every fork+exec
costs ~20x under TCG):

1. kernel modules from ``/etc/kata-agent/modules.list`` (absolute .ko paths, in
   dependency order) via finit_module(2); EEXIST means built in or loaded: fine; then
   those of ``modules.virtio`` (``<virtio device id> <path>...`` per line) whose device
   the guest has (``/sys/bus/virtio/devices/*/device``, filled synchronously while
   virtio_pci / virtio_mmio load): each module costs start-up time under TCG, so e.g.
   virtio_net loads only when the VM has a NIC and virtio_balloon only when it has a
   balloon. A device hot-plugged later gets its modules when a request needs it
   (`DEVICE_MODULES.load_present`, e.g. while UpdateInterface waits for its NIC);
2. mounts: /dev/pts (a new devpts instance, ptmx usable by all), /dev/shm, /run, /tmp,
   and cgroup2 on /sys/fs/cgroup with the container controllers (cpu, memory, pids, io,
   where present) enabled in the root's ``cgroup.subtree_control`` so crun can use them;
3. ``/dev/virtio-ports/<name>`` symlinks (there is no udev);
4. under TCG (the host sets ``agent.sched_throughput``), `tune_wakeups`: a woken task
   preempts the running one only once it is 4 ms behind it, not Linux's 1 ms (on one
   vCPU; both grow alike with vCPUs hot-plugged later). On the
   guest's one vCPU a pty's flush worker, woken at every line a process writes to its
   terminal, otherwise preempted the writer each time, and every switch is emulated: 1 MiB
   through a tty took 4.8 s, 1.2 s so (docs/performance.md "Levers").

Each step reports failure on the console and goes on: a half-initialised guest that still
serves the agent API is far easier to debug than a kernel panic from a dead PID 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

from agent import syscalls

MODULES_LIST = "/etc/kata-agent/modules.list"
DEVICE_MODULES_LIST = "/etc/kata-agent/modules.virtio"
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
#: A loadable module's directory here has ``initstate`` once it is loaded.
SYS_MODULE = "/sys/module"
CGROUP_CONTROLLERS = ("cpu", "memory", "pids", "io")

# (fstype, source, target, flags, data)
_MOUNTS: tuple[tuple[str, str, str, int, str], ...] = (
    ("devpts", "devpts", "/dev/pts", syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
     "newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("tmpfs", "shm", "/dev/shm", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777"),
    ("tmpfs", "tmpfs", "/run", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755"),
    ("tmpfs", "tmpfs", "/tmp", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=1777"),
    ("cgroup2", "cgroup2", "/sys/fs/cgroup",
     syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, "nsdelegate"),
)


def warn(message: str) -> None:
    print(f"kata-agent: {message}", file=sys.stderr, flush=True)


def setup() -> None:
    """Everything PID 1 must do before serving (see module docstring)."""
    load_modules(MODULES_LIST)
    DEVICE_MODULES.load_present()
    mount_basics()
    enable_cgroup_controllers("/sys/fs/cgroup")
    link_virtio_ports()


#: CFS's wake-up preemption granularity under TCG (`tune_wakeups`); Linux's is 1 ms on one
#: CPU. tuned's throughput-performance profile sets 15 ms; 4 ms gained as much here.
WAKEUP_GRANULARITY_NS = 4_000_000
#: Where debugfs is mounted for that one write, then unmounted (containers never see it).
DEBUGFS_MOUNT = "/run/kata-agent-debugfs"


def tune_wakeups(granularity_ns: int = WAKEUP_GRANULARITY_NS,
                 mount_dir: str = DEBUGFS_MOUNT) -> None:
    """Set CFS's wake-up granularity (module docstring, step 4). The knob is in debugfs on
    Linux 5.13 to 6.5; a kernel without it (EEVDF, 6.6 on) keeps its own and we say so."""
    try:
        os.makedirs(mount_dir, mode=0o700, exist_ok=True)
        syscalls.mount("debugfs", mount_dir, "debugfs",
                       syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    except OSError as exc:
        warn(f"cannot mount debugfs to tune the scheduler: {exc}")
        with contextlib.suppress(OSError):
            os.rmdir(mount_dir)
        return
    sched = os.path.join(mount_dir, "sched")
    try:
        with open(os.path.join(sched, "wakeup_granularity_ns"), "w") as f:
            f.write(str(granularity_ns))
        # A vCPU coming online (hot-plug) makes the kernel recompute the knob from a base
        # per CPU count; writing the scaling mode back re-derives that base from our value.
        scaling = os.path.join(sched, "tunable_scaling")
        with open(scaling) as f:
            mode = f.read().strip()
        with open(scaling, "w") as f:
            f.write(mode)
    except OSError as exc:
        warn(f"cannot set the scheduler's wake-up granularity: {exc}")
    finally:
        try:
            syscalls.umount(mount_dir, syscalls.MNT_DETACH)
            os.rmdir(mount_dir)
        except OSError as exc:
            warn(f"cannot unmount debugfs from {mount_dir}: {exc}")


def _list_lines(list_path: str) -> list[list[str]]:
    """The words of each line of a module list (no blank lines, no comments); [] if absent."""
    try:
        with open(list_path) as f:
            return [line.split() for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _load(paths: list[str]) -> None:
    for path in paths:
        # With the shared root image the loader initrd has loaded the PCI transport
        # already: a second finit_module would read and lay out the module to learn that.
        name = os.path.basename(path).split(".", 1)[0].replace("-", "_")
        if os.path.exists(os.path.join(SYS_MODULE, name, "initstate")):
            continue
        try:
            syscalls.finit_module(path)
        except OSError as exc:
            warn(f"cannot load module {path}: {exc}")


def load_modules(list_path: str) -> None:
    _load([words[0] for words in _list_lines(list_path)])


def virtio_device_ids(devices_dir: str) -> set[int]:
    """The virtio device ids (``device`` files, e.g. ``0x0005``) of the guest's devices."""
    try:
        entries = os.listdir(devices_dir)
    except FileNotFoundError:
        return set()
    ids: set[int] = set()
    for entry in entries:
        try:
            with open(os.path.join(devices_dir, entry, "device")) as f:
                ids.add(int(f.read(16).strip(), 16))
        except (OSError, ValueError):
            continue
    return ids


class DeviceModules:
    """Loads the modules of a ``modules.virtio`` line once a device of its id is present.

    Each id's modules load at most once per process (the kernel keeps them), so callers may
    ask again whenever a device may have appeared; a lock makes it safe from worker threads.
    """

    def __init__(self, list_path: str = DEVICE_MODULES_LIST,
                 devices_dir: str = VIRTIO_DEVICES) -> None:
        self._list_path, self._devices_dir = list_path, devices_dir
        self._lines: list[list[str]] | None = None
        self._loaded: set[int] = set()
        self._lock = threading.Lock()

    def load_present(self) -> None:
        with self._lock:
            if self._lines is None:
                self._lines = _list_lines(self._list_path)
            wanted = [(int(device_id), paths) for device_id, *paths in self._lines
                      if device_id.isdigit() and int(device_id) not in self._loaded]
            if not wanted:
                return
            present = virtio_device_ids(self._devices_dir)
            for device_id, paths in wanted:
                if device_id in present:
                    _load(paths)
                    self._loaded.add(device_id)


#: The guest's device modules: loaded by `setup`, then on demand (module docstring).
DEVICE_MODULES = DeviceModules()


def mounted_targets() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f if len(line.split()) > 1}


def mount_basics() -> None:
    done = mounted_targets()
    for fstype, source, target, flags, data in _MOUNTS:
        if target in done:
            continue
        try:
            os.makedirs(target, exist_ok=True)
            syscalls.mount(source, target, fstype, flags, data)
        except OSError as exc:
            warn(f"cannot mount {fstype} on {target}: {exc}")
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")


def enable_cgroup_controllers(root: str) -> None:
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            available = set(f.read().split())
    except OSError as exc:
        warn(f"no cgroup2 at {root}: {exc}")
        return
    wanted = [c for c in CGROUP_CONTROLLERS if c in available]
    try:
        with open(os.path.join(root, "cgroup.subtree_control"), "w") as f:
            f.write(" ".join(f"+{c}" for c in wanted))
    except OSError as exc:
        warn(f"cannot enable cgroup controllers {wanted}: {exc}")


def link_virtio_ports(sys_dir: str = "/sys/class/virtio-ports",
                      dev_dir: str = "/dev/virtio-ports") -> None:
    """``/dev/virtio-ports/<name>`` -> ``../vportNpM``, as udev would make them."""
    try:
        entries = os.listdir(sys_dir)
    except FileNotFoundError:
        return
    os.makedirs(dev_dir, exist_ok=True)
    for entry in entries:
        try:
            with open(os.path.join(sys_dir, entry, "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        link = os.path.join(dev_dir, name)
        if name and "/" not in name and not os.path.lexists(link):
            os.symlink(f"../{entry}", link)
