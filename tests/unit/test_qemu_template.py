"""QEMU VM templates (hypervisors/qemu/template.py): which VMs a template can serve, the
shape it is matched by, its directory's checks, and the QMP sequences of save, restore and
hot-plug (against a recording stand-in for QMP)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice
from hypervisors.qemu import template as tpl
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv
from hypervisors.qemu.config import QemuConfig
from hypervisors.statepaths import StatePaths

CONFIG = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512)
SHARE = SharedFsDevice(Path("/s/shared"), "virtio-fs", "kataShared")
NIC = NetworkDevice("eth0", "02:00:00:00:00:01", 1500, (7,))


def vm(sandbox_id: str = "sb1", **kw: Any) -> VmParams:
    base: dict[str, Any] = {"sandbox_id": sandbox_id,
                            "paths": StatePaths(Path(f"/run/kata-py/sbs/{sandbox_id}")),
                            "accelerator": "tcg", "shared_fs": SHARE, "networks": (NIC,)}
    return VmParams(**(base | kw))


def make_template(**kw: Any) -> tpl.Template:
    base: dict[str, Any] = {"argv": tpl.shape(CONFIG, vm()), "files": {"/k/vmlinuz": [1, 2]},
                            "created": 1.0, "boot_seconds": 2.0, "save_seconds": 1.0,
                            "state_bytes": 5, "vcpus": 1, "memory_mib": 512}
    return tpl.Template(**(base | kw))


# -- which VMs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "machine", "words"), [
    (vm(), "microvm", "no PCIe root ports"),
    (vm(agent_channel=AgentChannel.VSOCK, guest_cid=9), "q35", "vsock"),
    (vm(shared_fs=SharedFsDevice(Path("/s"), "virtio-9p", "t")), "q35", "virtio-9p"),
    (vm(blocks=(BlockDevice("d0", Path("/d")),)), "q35", "block devices"),
    (vm(networks=(NIC,) * 4), "q35", "5 devices"),
])
def test_vms_a_template_cannot_serve_are_named(params: VmParams, machine: str,
                                               words: str) -> None:
    why = tpl.refusal(params, machine)
    assert why is not None and words in why


def test_a_pod_vm_with_a_share_and_three_nics_fits() -> None:
    assert tpl.refusal(vm(networks=(NIC,) * 3), "q35") is None
    assert tpl.refusal(vm(shared_fs=None, networks=()), "q35") is None


def test_the_template_view_has_root_ports_ram_in_a_file_and_no_devices() -> None:
    argv = build_argv(CONFIG, tpl.template_view(CONFIG, vm(), "/proc/self/fd/9", incoming=True))
    text = " ".join(argv)
    assert "vhost-user-fs" not in text and "virtio-net" not in text and "tap" not in text
    # shared for the later share, and in a file: the state leaves it out (x-ignore-shared)
    assert ("memory-backend-file,id=mem,size=512M,share=on,mem-path=/proc/self/fd/9"
            in text), text
    assert "memory-backend-memfd" not in text
    ports = [a for a in argv if a.startswith("pcie-root-port")]
    assert ports == [f"pcie-root-port,id=rp{i},bus=pcie.0,chassis=1,slot={i + 1}"
                     for i in range(tpl.TEMPLATE_PORTS)]
    assert argv[-2:] == ["-incoming", "defer"]
    assert "-incoming" not in build_argv(CONFIG, tpl.template_view(CONFIG, vm(), "/t/ram"))
    # a VM booted for a pod keeps QEMU's own memfd
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in " ".join(build_argv(CONFIG, vm()))


def test_the_shape_leaves_out_names_paths_and_devices_only() -> None:
    one = tpl.shape(CONFIG, vm("sb1"))
    assert one == tpl.shape(CONFIG, vm("another", networks=(), shared_fs=None))
    assert "sb1" not in " ".join(one)
    assert one != tpl.shape(CONFIG, vm(memory_mib=1024))
    assert one != tpl.shape(CONFIG, vm(extra_kernel_params=("agent.debug_console",)))
    assert one != tpl.shape(dataclasses.replace(CONFIG, kernel="/k/other"), vm())


def test_mismatch_names_a_changed_file_or_the_first_differing_argument() -> None:
    template = make_template()
    assert tpl.mismatch(template, template.argv, template.files) is None
    why = tpl.mismatch(template, template.argv, {"/k/vmlinuz": [1, 3]})
    assert why == "/k/vmlinuz is not the file the template was made with"
    other = tpl.shape(CONFIG, vm(memory_mib=1024))
    why = tpl.mismatch(template, other, template.files)
    assert why is not None and "'-m 1024M' where the template has '-m 512M'" in why
    other = tpl.shape(CONFIG, vm(extra_kernel_params=("agent.debug_console",)))
    why = tpl.mismatch(template, other, template.files)
    assert why is not None and why.endswith(
        "'-append agent.debug_console' where the template has '-append -'"), why
    why = tpl.mismatch(template, template.argv[:-1], template.files)
    assert why is not None and "'-device ' where the template has '-device pcie-root-port" in why


def test_a_vm_smaller_than_the_template_cannot_start_from_it() -> None:
    template = make_template()
    assert tpl.too_small(template, 1, 512) is None and tpl.too_small(template, 4, 4096) is None
    why = tpl.too_small(template, 1, 384)
    assert why == ("the VM (1 vCPUs, 384 MiB) is smaller than the template (1 vCPUs, "
                   "512 MiB)")
    assert tpl.too_small(dataclasses.replace(template, vcpus=2), 1, 4096) is not None


# -- the directory --------------------------------------------------------------------------


def saved(tmp: Path, state: bytes = b"12345") -> Path:
    d = tmp / "tpl"
    tpl.prepare_dir(d)
    fd = tpl.open_state(d, write=True)
    os.write(fd, state)
    os.close(fd)
    with open(d / tpl.RAM_FILE, "wb") as ram:
        ram.truncate(512 << 20)  # sparse, as the template's memory_mib
    tpl.write_meta(d, make_template(state_bytes=len(state)))
    return d


def test_a_saved_template_loads_back(tmp_path: Path) -> None:
    d = saved(tmp_path)
    assert tpl.load(d) == make_template()
    assert os.stat(d).st_mode & 0o777 == 0o700
    assert os.stat(d / tpl.STATE_FILE).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("spoil", "words"), [
    (lambda d: (d / tpl.META_FILE).unlink(), "incomplete"),
    (lambda d: (d / tpl.META_FILE).write_text("{"), "not one this version wrote"),
    (lambda d: (d / tpl.META_FILE).write_text('{"argv": []}'), "not one this version wrote"),
    (lambda d: (d / tpl.STATE_FILE).write_bytes(b"123"), "not the file that was saved"),
    (lambda d: (d / tpl.STATE_FILE).unlink(), "has no state"),
    (lambda d: (d / tpl.RAM_FILE).unlink(), "has no ram"),
    (lambda d: os.truncate(d / tpl.RAM_FILE, 4096), "ram is not the file that was saved"),
    (lambda d: (d / tpl.META_FILE).write_text(
        (d / tpl.META_FILE).read_text().replace('"format": 2', '"format": 1')),
     "format 1, this version reads 2"),
    (lambda d: os.chmod(d, 0o755), "must be ours and 0700"),
])
def test_a_spoilt_template_is_refused_with_the_reason(tmp_path: Path, spoil: Any,
                                                      words: str) -> None:
    d = saved(tmp_path)
    spoil(d)
    with pytest.raises(tpl.TemplateError, match=words):
        tpl.load(d)


def test_a_template_reached_through_a_link_is_refused(tmp_path: Path) -> None:
    d = saved(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(tpl.TemplateError, match="not a directory"):
        tpl.load(link)
    state = d / tpl.STATE_FILE
    state.rename(tmp_path / "elsewhere")
    state.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(tpl.TemplateError):
        tpl.open_state(d)
    with pytest.raises(tpl.TemplateError, match="not the file that was saved"):
        tpl.load(d)


def test_no_template_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(tpl.TemplateError, match="kata-runtime factory init"):
        tpl.load(tmp_path / "none")


def test_removal_takes_only_a_templates_files(tmp_path: Path) -> None:
    d = saved(tmp_path)
    (d / "console.log").write_text("boot")
    assert tpl.remove_files(d) is True and not d.exists()
    assert tpl.remove_files(d) is False
    d = saved(tmp_path)
    (d / "precious").write_text("not ours")
    with pytest.raises(tpl.TemplateError, match="precious"):
        tpl.remove_files(d)
    assert (d / "precious").read_text() == "not ours"
    assert not (d / tpl.STATE_FILE).exists()


def test_prepare_empties_a_former_template(tmp_path: Path) -> None:
    d = saved(tmp_path)
    tpl.prepare_dir(d)
    assert d.is_dir() and os.listdir(d) == []


# -- the RAM ---------------------------------------------------------------------------------


PAGES = {0: b"\x01", 3: b"\xff" * 4096, 700: b"tail"}  # page index -> what it starts with


def write_ram(path: Path, pages: int = 1024, dense: bool = True) -> None:
    """A RAM file with data in PAGES; its other pages zeros written out (``dense``, as a
    guest leaves them) or holes."""
    with open(path, "wb") as f:
        if dense:
            f.write(bytes(pages * tpl.PAGE))
        f.truncate(pages * tpl.PAGE)
        for index, data in PAGES.items():
            f.seek(index * tpl.PAGE)
            f.write(data)


def allocated(fd_or_path: int | Path) -> int:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_blocks * 512


def test_sparsify_keeps_the_bytes_and_drops_the_zero_pages(tmp_path: Path) -> None:
    write_ram(tmp_path / tpl.RAM_FILE)
    before = (tmp_path / tpl.RAM_FILE).read_bytes()
    assert allocated(tmp_path / tpl.RAM_FILE) >= 1024 * tpl.PAGE
    tpl.sparsify_ram(tmp_path)
    assert (tmp_path / tpl.RAM_FILE).read_bytes() == before
    assert allocated(tmp_path / tpl.RAM_FILE) <= len(PAGES) * tpl.PAGE * 2  # fs granularity
    assert os.stat(tmp_path / tpl.RAM_FILE).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == [tpl.RAM_FILE]


def test_a_restored_vm_gets_the_templates_pages_in_a_memfd(tmp_path: Path) -> None:
    write_ram(tmp_path / tpl.RAM_FILE, pages=256 * 256, dense=False)  # 256 MiB, sparse
    template = make_template(memory_mib=256)
    fd = tpl.guest_ram(template)
    try:
        assert allocated(fd) == 0 and os.fstat(fd).st_size == 256 << 20  # QEMU may map it
        tpl.fill_guest_ram(tmp_path, template, fd)
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:guest-ram")
        assert os.fstat(fd).st_size == 256 << 20
        assert allocated(fd) <= len(PAGES) * tpl.PAGE * 2  # the holes stay unallocated
        for index, data in PAGES.items():
            assert os.pread(fd, len(data) + 1, index * tpl.PAGE) == data + b"\0"
        assert os.pread(fd, tpl.PAGE, 5 * tpl.PAGE) == bytes(tpl.PAGE)
        assert os.get_inheritable(fd) is False  # QEMU gets it through pass_fds only
    finally:
        os.close(fd)
    for spoilt, words in ((make_template(memory_mib=512), "ram is not the file that was saved"),
                          (template, "failed to open VM template RAM")):
        if spoilt is template:
            (tmp_path / tpl.RAM_FILE).unlink()
        fd = tpl.guest_ram(spoilt)
        try:
            with pytest.raises(tpl.TemplateError, match=words):
                tpl.fill_guest_ram(tmp_path, spoilt, fd)
        finally:
            os.close(fd)


def test_a_copy_across_file_systems_goes_through_a_buffer(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(*args: Any) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    write_ram(tmp_path / tpl.RAM_FILE, pages=256 * 256, dense=False)
    monkeypatch.setattr(os, "copy_file_range", cross_device)
    fd = tpl.guest_ram(make_template(memory_mib=256))
    try:
        tpl.fill_guest_ram(tmp_path, make_template(memory_mib=256), fd)
        assert os.pread(fd, 4, 700 * tpl.PAGE) == b"tail"
    finally:
        os.close(fd)


# -- QMP ------------------------------------------------------------------------------------


class Recorder:
    """QMP as the template code uses it: every command recorded, canned answers."""

    def __init__(self, statuses: list[str] | None = None,
                 migrate: list[str] | None = None) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.statuses = statuses or ["inmigrate", "paused"]
        self.migrate = migrate or ["active", "completed"]

    async def execute(self, command: str, arguments: Any = None) -> Any:
        self.sent.append((command, arguments))
        if command == "query-migrate":
            return {"status": self.migrate.pop(0), "error-desc": "boom"}
        return {}

    async def get_fd(self, name: str, fd: int) -> None:
        self.sent.append(("getfd", name))

    async def query_status(self) -> str:
        self.sent.append(("query-status", None))
        return self.statuses.pop(0)


def commands(qmp: Recorder) -> list[str]:
    return [c for c, _ in qmp.sent]


def test_save_pauses_then_migrates_to_the_fd() -> None:
    qmp = Recorder()
    asyncio.run(tpl.save_state(qmp, 5))  # type: ignore[arg-type]
    assert commands(qmp) == ["stop", "migrate-set-capabilities", "getfd", "migrate",
                             "query-migrate", "query-migrate"]
    assert qmp.sent[1][1] == {"capabilities": tpl.IGNORE_SHARED}  # the RAM stays in its file
    assert qmp.sent[3] == ("migrate", {"uri": "fd:template-state"})


def test_a_failed_save_says_so() -> None:
    qmp = Recorder(migrate=["failed"])
    with pytest.raises(tpl.TemplateError, match="migration failed: boom"):
        asyncio.run(tpl.save_state(qmp, 5))  # type: ignore[arg-type]


def test_restore_loads_waits_and_continues() -> None:
    qmp = Recorder()
    asyncio.run(tpl.load_state(qmp, 5))  # type: ignore[arg-type]
    assert commands(qmp) == ["migrate-set-capabilities", "getfd", "migrate-incoming",
                             "query-status", "query-status", "cont"]
    assert qmp.sent[0][1] == {"capabilities": tpl.IGNORE_SHARED}


def test_a_restore_that_ends_badly_is_an_error() -> None:
    qmp = Recorder(statuses=["inmigrate", "internal-error"])
    with pytest.raises(tpl.TemplateError, match="internal-error"):
        asyncio.run(tpl.load_state(qmp, 5))  # type: ignore[arg-type]
    assert "cont" not in commands(qmp)


def test_the_share_is_plugged_into_its_root_port() -> None:
    qmp = Recorder()
    asyncio.run(tpl.plug_share(qmp, Path("/s/virtiofsd.sock"), "kataShared", 0))  # type: ignore[arg-type]
    (_, chardev), (_, device) = qmp.sent
    assert chardev["backend"]["data"]["addr"]["data"]["path"] == "/s/virtiofsd.sock"
    assert device == {"driver": "vhost-user-fs-pci", "id": "vfs0", "chardev": "vfs",
                      "tag": "kataShared", "bus": "rp0"}


def test_a_nic_is_plugged_on_its_tap_fds() -> None:
    qmp = Recorder()
    asyncio.run(tpl.plug_nic(qmp, NIC, 1))  # type: ignore[arg-type]
    assert qmp.sent[:2] == [("getfd", "tap-eth0-0"),
                            ("netdev_add", {"type": "tap", "id": "netdev-eth0",
                                            "fd": "tap-eth0-0"})]
    assert qmp.sent[2][1] == {"driver": "virtio-net-pci", "id": "eth0", "netdev": "netdev-eth0",
                              "mac": NIC.mac, "host_mtu": 1500, "bus": "rp1"}
    multi = Recorder()
    asyncio.run(tpl.plug_nic(multi, dataclasses.replace(NIC, tap_fds=(7, 8)), 2))  # type: ignore[arg-type]
    assert multi.sent[2][1]["fds"] == "tap-eth0-0:tap-eth0-1"
    assert multi.sent[3][1]["mq"] is True and multi.sent[3][1]["vectors"] == 6


# -- which pods a template serves (Qemu.template_fit) ----------------------------------------


def fit(tmp: Path, vcpus: int, memory: int, **config: Any) -> str | None:
    """Why a pod VM of this size would not be restored from a 1 vCPU, 256 MiB template."""
    why, _ = pod_vm(tmp, vcpus, memory, **config)
    return why


def pod_vm(tmp: Path, vcpus: int, memory: int, **config: Any) -> tuple[str | None, Any]:
    """(why not restored, the pod's Qemu with its template chosen)."""
    from hypervisors.accel import AccelChoice
    from hypervisors.base import VmSpec
    from hypervisors.qemu.vm import Qemu

    for name in ("vmlinuz", "initrd.img"):
        if not (tmp / name).exists():  # once: a rewritten file voids the template
            (tmp / name).write_bytes(b"guest")
    qemu_config = QemuConfig(kernel=str(tmp / "vmlinuz"), initrd=str(tmp / "initrd.img"),
                             path="/bin/true", **config)
    d = tmp / "tpl"

    def vm_of(spec: VmSpec) -> Qemu:
        made = Qemu(qemu_config, spec)
        made._accel = AccelChoice("tcg", "test")
        made._devices.add(SHARE)
        return made

    template_vm = vm_of(VmSpec("template", d, vcpus=1, memory_mib=256, template_dir=d))
    if not d.exists():
        tpl.prepare_dir(d)
        fd = tpl.open_state(d, write=True)
        os.write(fd, b"state")
        os.close(fd)
        with open(d / tpl.RAM_FILE, "wb") as ram:
            ram.truncate(256 << 20)
        tpl.write_meta(d, tpl.Template(
            argv=tpl.shape(qemu_config, template_vm._device_params()),
            files=tpl.file_ids(qemu_config), created=1.0, boot_seconds=1.0, save_seconds=1.0,
            state_bytes=5, vcpus=1, memory_mib=256))
    pod = vm_of(VmSpec("pod", tmp / "pod", vcpus=vcpus, memory_mib=memory, template_dir=d))
    why, template = pod.template_fit(d)
    assert (why is None) == (template is not None)
    pod._template = template
    return why, pod


def test_a_pod_grows_from_the_template_only_where_hot_plug_allows(tmp_path: Path) -> None:
    assert fit(tmp_path, 2, 768, memory_slots=2, default_maxvcpus=4) is None
    assert fit(tmp_path, 1, 256, memory_slots=2, default_maxvcpus=4) is None
    why = fit(tmp_path, 1, 768, memory_slots=0, default_maxvcpus=4)
    assert why is not None and "memory_slots = 0 allows no hot-plug" in why
    why = fit(tmp_path, 2, 256, memory_slots=2, default_maxvcpus=0)
    assert why is not None and "needs 2 vCPUs" in why and "default_maxvcpus = 0" in why
    why = fit(tmp_path, 1, 128, memory_slots=2, default_maxvcpus=4)
    assert why is not None and "smaller than the template" in why


def test_a_restored_vm_maps_its_filled_ram_and_closes_it_when_undone(tmp_path: Path) -> None:
    import contextlib

    why, pod = pod_vm(tmp_path, 1, 768, memory_slots=2, default_maxvcpus=4)
    assert why is None

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await pod._before_spawn(stack)
            fd = pod._ram_fd
            assert fd is not None and pod._spawn_fds() == (fd,)
            argv = " ".join(pod.build_argv())
            assert f"memory-backend-file,id=mem,size=256M,share=on,mem-path=/proc/self/fd/{fd}" \
                in argv and "-incoming defer" in argv
        # a start that failed before QEMU took it: the copy ended, then the fd was closed
        assert pod._ram_fd is None and pod._ram_fill is None
        with pytest.raises(OSError):
            os.fstat(fd)

    asyncio.run(main())


def test_a_cancelled_restore_waits_for_the_copy_before_closing_the_ram(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import threading
    import time

    why, pod = pod_vm(tmp_path, 1, 768, memory_slots=2, default_maxvcpus=4)
    assert why is None
    copying, written = threading.Event(), []

    def slow_fill(template_dir: Path, template: tpl.Template, fd: int) -> None:
        copying.set()
        time.sleep(0.3)
        written.append(os.pwrite(fd, b"x", 0))  # EBADF had the fd been closed under it

    monkeypatch.setattr(tpl, "fill_guest_ram", slow_fill)

    async def start() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await pod._before_spawn(stack)
            await asyncio.sleep(10)  # spawning QEMU, say

    async def main() -> None:
        task = asyncio.ensure_future(start())
        while not copying.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert written == [1] and pod._ram_fd is None

    asyncio.run(main())


@pytest.mark.parametrize(("error", "words"), [
    (tpl.TemplateError("VM template /t/ram is not the file that was saved"), "not the file"),
    (OSError(28, "No space left on device"), "failed to fill VM pod's RAM from its template"),
])
def test_a_copy_that_fails_fails_the_restore_before_qemu_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, words: str) -> None:
    """The driver then boots the VM instead (`Qemu.start`), as for a state that cannot load."""
    import contextlib

    from hypervisors.errors import HypervisorError

    why, pod = pod_vm(tmp_path, 1, 768, memory_slots=2, default_maxvcpus=4)
    assert why is None

    def failing_fill(template_dir: Path, template: tpl.Template, fd: int) -> None:
        raise error

    monkeypatch.setattr(tpl, "fill_guest_ram", failing_fill)

    async def main() -> None:
        with pytest.raises(HypervisorError, match=words):
            async with contextlib.AsyncExitStack() as stack:
                await pod._before_spawn(stack)
                await pod._after_connect()  # raises before any QMP command
        assert pod._ram_fd is None and pod._ram_fill is None

    asyncio.run(main())
