"""QEMU VM templates: one guest booted and saved once, each pod's VM restored from it.

Theory of operation
-------------------
A template is a directory, root's and 0700, holding ``ram`` (the guest's RAM: the
template VM's memory backend is this file), ``state`` (the QMP ``migrate`` stream of a
guest paused once its agent served, without the RAM: ``x-ignore-shared``) and
``template.json`` (`Template`: what it was made from). It is made by booting a VM
shaped like a pod's (`template_view`: the pod's command line without its devices, plus
`TEMPLATE_PORTS` empty PCIe root ports, and guest RAM shared as virtio-fs needs) at the
smallest size a pod may have. A pod's VM is restored
from it by `hypervisors.qemu.vm.Qemu.start` only when its command line at the template's
size (`shape`: with the sandbox's names and paths left out) and the files it names (QEMU,
kernel, initrd, root image, firmware: size and mtime) are what it was saved with (`mismatch`), and
hot-plug can grow it to the pod's size (`too_small`); otherwise the VM boots and the log
says why.

A restored VM gets its RAM as a memfd the host fills, while QEMU starts, with the pages of
``ram`` that are not zero (`guest_ram`, `fill_guest_ram`: ``ram`` is made sparse once
saved), so QEMU loads only the device state. Loaded from the stream instead, the RAM
took QEMU 0.2-0.3 s to fault in, every page of the template's size (zero ones too), and
stayed allocated: 355 against 171 MiB of PSS per idle restored pod (docs/performance.md).

After the restore the pod's own devices are hot-plugged into the root ports (`plug_share`,
`plug_nic`), then its extra vCPUs and memory. Devices come late because QEMU 7.2 refuses
to migrate a VM that has a vhost-user-fs device, and a pod's NICs and share are its own.
The state goes through an fd (``getfd``) because ``exec:`` migration makes QEMU exit under
its seccomp sandbox. The template is saved before any host has talked to the agent: a
guest saved right after a host closed its agent session did not answer after restore
(docs/performance.md, "Pre-booted VMs").

What clones share, and how it is mended, is the sandbox's part (`sandbox.template`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import itertools
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from hypervisors.base import NetworkDevice
from hypervisors.errors import HypervisorError
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv, root_port, virtio
from hypervisors.qemu.config import QemuConfig, is_mmio
from hypervisors.qmp import QmpClient
from hypervisors.statepaths import StatePaths

#: Root ports a template keeps free: the share and up to three NICs.
TEMPLATE_PORTS = 4
STATE_FILE = "state"
RAM_FILE = "ram"
META_FILE = "template.json"
#: Everything a template directory may hold: its files and those of the VM that made it.
TEMPLATE_FILES = (STATE_FILE, RAM_FILE, f".{RAM_FILE}.tmp", META_FILE, "console.log",
                  "vmm.stderr", "vmm.pid", "virtiofsd.stderr",
                  *(p.name for p in StatePaths(Path("/")).sockets()))
#: 2: the RAM in ``ram``, not in the stream.
FORMAT = 2
#: The migration capability that leaves shared file-backed RAM out of the stream.
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
PAGE = 4096
COPY_CHUNK = 1 << 20
META_MAX_BYTES = 1 << 20
SAVE_TIMEOUT = 120.0
LOAD_TIMEOUT = 60.0
LOAD_POLL = 0.005  # without its RAM, a state loads in ~15 ms
_PLACEHOLDER = StatePaths(Path("/template"))


class TemplateError(HypervisorError):
    """A template that cannot be used, made or removed, and why."""


@dataclasses.dataclass(frozen=True)
class Template:
    """``template.json``."""

    argv: list[str]
    files: dict[str, list[int]]
    #: The size it was booted at: a pod's VM may be bigger (hot-plugged after the restore).
    vcpus: int
    memory_mib: int
    created: float
    boot_seconds: float
    save_seconds: float
    state_bytes: int
    format: int = FORMAT


def refusal(vm: VmParams, machine_type: str) -> str | None:
    """Why a VM with these devices cannot come from a template at all; None if it can."""
    if is_mmio(machine_type):
        return f"machine_type {machine_type!r} has no PCIe root ports to plug devices into"
    if vm.agent_channel is not AgentChannel.SERIAL:
        return ("the agent is on vsock (a restored guest would keep the template's CID, "
                "and a vhost-user back-end's rings are not saved); set use_vsock = false "
                "for templates")
    if vm.shared_fs is not None and vm.shared_fs.kind != "virtio-fs":
        return f"a {vm.shared_fs.kind} share cannot be hot-plugged (use virtio-fs)"
    if vm.blocks:
        return "block devices are not plugged into a restored VM by this version"
    wanted = len(vm.networks) + (vm.shared_fs is not None)
    if wanted > TEMPLATE_PORTS:
        return f"it has {wanted} devices, more than the template's {TEMPLATE_PORTS} root ports"
    return None


def template_view(config: QemuConfig, vm: VmParams, ram_file: str,
                  incoming: bool = False) -> VmParams:
    """``vm`` as a template has it: no devices, empty root ports, RAM shared for virtio-fs
    and kept in ``ram_file`` (the template's file, or a restored VM's filled memfd)."""
    return dataclasses.replace(vm, shared_fs=None, networks=(), blocks=(),
                               hotplug_ports=TEMPLATE_PORTS,
                               hotplug_virtio_fs=config.shared_fs == "virtio-fs",
                               incoming=incoming, ram_file=ram_file)


def shape(config: QemuConfig, vm: VmParams) -> list[str]:
    """The command line of ``vm``'s template view with its own names and paths left out:
    equal for every VM a template can serve."""
    view = dataclasses.replace(
        template_view(config, vm, str(_PLACEHOLDER.state_dir / RAM_FILE)),
        sandbox_id="template", paths=_PLACEHOLDER)
    return build_argv(config, view)


def file_ids(config: QemuConfig) -> dict[str, list[int]]:
    """(size, mtime) of QEMU, kernel, initrd, root image and firmware: a rebuilt guest
    voids a template."""
    ids: dict[str, list[int]] = {}
    for path in (shutil.which(config.path) or config.path, config.kernel, config.initrd,
                 config.image, config.firmware):
        if path:
            st = os.stat(path)
            ids[path] = [st.st_size, st.st_mtime_ns]
    return ids


def mismatch(template: Template, argv: list[str], files: dict[str, list[int]]) -> str | None:
    """Why ``template`` does not fit a VM with this `shape` and these `file_ids`."""
    for path in sorted(files.keys() | template.files.keys()):
        if files.get(path) != template.files.get(path):
            return f"{path} is not the file the template was made with"
    if argv != template.argv:
        pairs = list(itertools.zip_longest(argv, template.argv, fillvalue=""))
        i = next(i for i, (a, b) in enumerate(pairs) if a != b)
        flag = pairs[i - 1][0] + " " if i and pairs[i - 1][0].startswith("-") else ""
        ours, theirs = pairs[i]
        if " " in ours and " " in theirs:  # a list such as -append's: name the words
            ours = " ".join(w for w in ours.split() if w not in theirs.split()) or "-"
            theirs = " ".join(w for w in theirs.split() if w not in pairs[i][0].split()) or "-"
        return (f"the VM's command line differs from the template's: {(flag + ours)[:200]!r} "
                f"where the template has {(flag + theirs)[:200]!r}")
    return None


def too_small(template: Template, vcpus: int, memory_mib: int) -> str | None:
    """Why a VM of this size cannot start from ``template`` (it can only grow)."""
    if vcpus < template.vcpus or memory_mib < template.memory_mib:
        return (f"the VM ({vcpus} vCPUs, {memory_mib} MiB) is smaller than the template "
                f"({template.vcpus} vCPUs, {template.memory_mib} MiB)")
    return None


# -- the directory -------------------------------------------------------------------------


def check_dir(template_dir: Path) -> None:
    """A template directory must be a real directory that only we can write: a template is
    guest memory every pod would run."""
    try:
        st = os.lstat(template_dir)
    except FileNotFoundError as e:
        raise TemplateError(f"no VM template at {template_dir}: run `kata-runtime factory "
                            "init`") from e
    if not stat.S_ISDIR(st.st_mode):
        raise TemplateError(f"VM template {template_dir} is not a directory (a link or a "
                            "file): remove it, then run `kata-runtime factory init`")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise TemplateError(
            f"VM template {template_dir} is owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):o}: it must be ours and 0700; run `kata-runtime "
            "factory destroy` and `init` again")


def prepare_dir(template_dir: Path) -> None:
    """An empty template directory: made 0700, or emptied of a former template's files."""
    if os.path.lexists(template_dir):
        remove_files(template_dir)
    template_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_dir(template_dir)


def remove_files(template_dir: Path) -> bool:
    """Remove a template's files (only those: a mistyped template_path loses nothing else),
    then the directory if that left it empty. False if there was no template."""
    if not os.path.lexists(template_dir):
        return False
    check_dir(template_dir)
    for name in TEMPLATE_FILES:
        (template_dir / name).unlink(missing_ok=True)
    try:
        template_dir.rmdir()
    except OSError as e:
        raise TemplateError(f"VM template {template_dir} still holds files that are not a "
                            f"template's ({', '.join(sorted(os.listdir(template_dir)))[:200]})"
                            ": not removed") from e
    return True


def open_state(template_dir: Path, write: bool = False) -> int:
    """The state file, never through a link."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= os.O_WRONLY | os.O_CREAT | os.O_TRUNC if write else os.O_RDONLY
    try:
        return os.open(template_dir / STATE_FILE, flags, 0o600)
    except OSError as e:
        raise TemplateError(f"failed to open VM template state {template_dir / STATE_FILE}: "
                            f"{e.strerror}") from e


def write_meta(template_dir: Path, template: Template) -> None:
    """``template.json``, written last: a template without it is incomplete."""
    tmp = template_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(template), indent=1) + "\n")
    os.replace(tmp, template_dir / META_FILE)


def load(template_dir: Path) -> Template:
    """The template in ``template_dir``, checked; `TemplateError` says what is wrong."""
    check_dir(template_dir)
    try:
        fd = os.open(template_dir / META_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise TemplateError(f"VM template {template_dir} is incomplete ({META_FILE}: "
                            f"{e.strerror}): run `kata-runtime factory init`") from e
    with os.fdopen(fd, "rb") as f:
        raw = f.read(META_MAX_BYTES + 1)
    try:
        doc: Any = json.loads(raw) if len(raw) <= META_MAX_BYTES else None
        template = Template(**doc)
    except (ValueError, TypeError) as e:
        raise TemplateError(f"VM template {template_dir}/{META_FILE} is not one this version "
                            "wrote: run `kata-runtime factory init`") from e
    if template.format != FORMAT:
        raise TemplateError(f"VM template {template_dir} has format {template.format}, this "
                            f"version reads {FORMAT}: run `kata-runtime factory init`")
    for name, size in ((STATE_FILE, template.state_bytes),
                       (RAM_FILE, template.memory_mib << 20)):
        try:
            st = os.lstat(template_dir / name)
        except OSError as e:
            raise TemplateError(f"VM template {template_dir} has no {name}: {e.strerror}: "
                                "run `kata-runtime factory init`") from e
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise TemplateError(f"VM template {template_dir}/{name} is not the file that "
                                "was saved: run `kata-runtime factory init`")
    return template


def sparsify_ram(template_dir: Path) -> None:
    """Rewrite ``ram`` with holes where its pages are zero (most of a fresh guest's are):
    every restore copies only what is left, and the template keeps only that."""
    path, tmp = template_dir / RAM_FILE, template_dir / f".{RAM_FILE}.tmp"
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    src = os.open(path, os.O_RDONLY | flags)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o600)
        try:
            size = os.fstat(src).st_size
            for offset, end in _data_extents(src, size):
                for at in range(offset, end, COPY_CHUNK):
                    _write_nonzero_pages(dst, os.pread(src, min(COPY_CHUNK, end - at), at), at)
            os.ftruncate(dst, size)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    os.replace(tmp, path)


def _write_nonzero_pages(fd: int, chunk: bytes, offset: int) -> None:
    """Write the runs of non-zero pages of ``chunk`` (read at ``offset``); zero ones stay holes."""
    zero = bytes(PAGE)
    view, start = memoryview(chunk), None
    for at in range(0, len(chunk) + PAGE, PAGE):
        is_data = at < len(chunk) and view[at:at + PAGE] != zero
        if is_data and start is None:
            start = at
        elif not is_data and start is not None:
            os.pwrite(fd, view[start:at], offset + start)
            start = None


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` that are not holes."""
    extents, offset = [], 0
    while offset < size:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(fd, offset, os.SEEK_HOLE)
        extents.append((offset, end))
        offset = end
    return extents


def guest_ram(template: Template) -> int:
    """An empty memfd of the template's RAM size, for a restored VM (it inherits the fd);
    `fill_guest_ram` fills it, while QEMU starts. The caller closes the fd."""
    memfd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, template.memory_mib << 20)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def fill_guest_ram(template_dir: Path, template: Template, memfd: int) -> None:
    """Copy the template's RAM into ``memfd``: only its data pages, the rest stays
    unallocated until the guest writes it."""
    try:
        src = os.open(template_dir / RAM_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise TemplateError(f"failed to open VM template RAM {template_dir / RAM_FILE}: "
                            f"{e.strerror}") from e
    try:
        size, st = template.memory_mib << 20, os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise TemplateError(f"VM template {template_dir}/{RAM_FILE} is not the file "
                                "that was saved: run `kata-runtime factory init`")
        for offset, end in _data_extents(src, size):
            _copy_range(src, memfd, offset, end)
    finally:
        os.close(src)


def _copy_range(src: int, dst: int, offset: int, end: int) -> None:
    """Copy [offset, end) of ``src`` to the same offsets of ``dst``: in the kernel, or
    through a buffer where the two file systems differ (a template_path on disk)."""
    while offset < end:
        try:
            done = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src, min(COPY_CHUNK, end - offset), offset)
            done = os.pwrite(dst, chunk, offset) if chunk else 0
        if done == 0:
            raise TemplateError("failed to copy the VM template's RAM: it shrank")
        offset += done


# -- QMP -----------------------------------------------------------------------------------


async def save_state(qmp: QmpClient, fd: int) -> None:
    """Pause the VM and write its state to ``fd`` (its RAM stays in its file)."""
    await qmp.execute("stop")
    await qmp.execute("migrate-set-capabilities", {"capabilities": IGNORE_SHARED})
    await qmp.get_fd("template-state", fd)
    await qmp.execute("migrate", {"uri": "fd:template-state"})
    deadline = time.monotonic() + SAVE_TIMEOUT
    while True:
        status: dict[str, Any] = await qmp.execute("query-migrate")
        if status.get("status") == "completed":
            return
        if status.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
            raise TemplateError(f"failed to save the VM: migration {status.get('status')}: "
                                f"{status.get('error-desc', '')}")
        await asyncio.sleep(0.05)


async def load_state(qmp: QmpClient, fd: int) -> None:
    """Load a saved state into a VM started with ``-incoming defer`` on the template's
    RAM (`guest_ram`), and run it."""
    await qmp.execute("migrate-set-capabilities", {"capabilities": IGNORE_SHARED})
    await qmp.get_fd("template-state", fd)
    await qmp.execute("migrate-incoming", {"uri": "fd:template-state"})
    deadline = time.monotonic() + LOAD_TIMEOUT
    while (status := await qmp.query_status()) == "inmigrate":
        if time.monotonic() > deadline:
            raise TemplateError(f"failed to restore the VM: still loading after {LOAD_TIMEOUT}s")
        await asyncio.sleep(LOAD_POLL)
    if status not in ("paused", "postmigrate", "running"):
        raise TemplateError(f"failed to restore the VM: it is {status!r} after loading")
    await qmp.execute("cont")  # the template was saved paused, and that state travels


async def plug_share(qmp: QmpClient, socket: Path, tag: str, port: int) -> None:
    """virtiofsd's socket as a chardev, and a vhost-user-fs device on it."""
    await qmp.execute("chardev-add", {"id": "vfs", "backend": {"type": "socket", "data": {
        "server": False, "addr": {"type": "unix", "data": {"path": str(socket)}}}}})
    await qmp.execute("device_add", {"driver": virtio("vhost-user-fs", False), "id": "vfs0",
                                     "chardev": "vfs", "tag": tag, "bus": root_port(port)})


async def plug_nic(qmp: QmpClient, nic: NetworkDevice, port: int) -> None:
    """A tap NIC on the caller's queue fds (``getfd`` each), as on a booted VM's command
    line (`hypervisors.qemu.args.VirtioNet`)."""
    names = [f"tap-{nic.id}-{i}" for i in range(len(nic.tap_fds))]
    for name, fd in zip(names, nic.tap_fds, strict=True):
        await qmp.get_fd(name, fd)
    netdev = f"netdev-{nic.id}"
    fds = {"fds": ":".join(names)} if len(names) > 1 else {"fd": names[0]}
    await qmp.execute("netdev_add", {"type": "tap", "id": netdev, **fds})
    device: dict[str, Any] = {"driver": virtio("virtio-net", False), "id": nic.id,
                              "netdev": netdev, "mac": nic.mac, "host_mtu": nic.mtu,
                              "bus": root_port(port)}
    if len(names) > 1:
        device |= {"mq": True, "vectors": 2 * len(names) + 2}
    await qmp.execute("device_add", device)


async def wait_for_mark(console_log: Path, mark: str, exited: asyncio.Future[Any],
                        timeout: float) -> None:
    """Until the guest console shows ``mark`` (the agent serves), the VMM exits or time
    runs out."""
    deadline = time.monotonic() + timeout
    while not exited.done():
        try:
            if mark.encode() in console_log.read_bytes():
                return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TemplateError(f"the template VM's agent did not start within {timeout:.0f}s;"
                                f" see {console_log}")
        await asyncio.sleep(0.05)
    raise TemplateError(f"the template VM exited while booting; see {console_log}")
