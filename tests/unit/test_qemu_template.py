"""QEMU VM templates (hypervisors/qemu/template.py): which VMs a template can serve, the
shape it is matched by, its directory's checks, and the QMP sequences of save, restore and
hot-plug (against a recording stand-in for QMP)."""

from __future__ import annotations

import asyncio
import dataclasses
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


def test_the_template_view_has_root_ports_shared_ram_and_no_devices() -> None:
    argv = build_argv(CONFIG, tpl.template_view(CONFIG, vm(), incoming=True))
    text = " ".join(argv)
    assert "vhost-user-fs" not in text and "virtio-net" not in text and "tap" not in text
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in text  # for the later share
    ports = [a for a in argv if a.startswith("pcie-root-port")]
    assert ports == [f"pcie-root-port,id=rp{i},bus=pcie.0,chassis=1,slot={i + 1}"
                     for i in range(tpl.TEMPLATE_PORTS)]
    assert argv[-2:] == ["-incoming", "defer"]
    assert "-incoming" not in build_argv(CONFIG, tpl.template_view(CONFIG, vm()))


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
    assert commands(qmp) == ["stop", "getfd", "migrate", "query-migrate", "query-migrate"]
    assert qmp.sent[2] == ("migrate", {"uri": "fd:template-state"})


def test_a_failed_save_says_so() -> None:
    qmp = Recorder(migrate=["failed"])
    with pytest.raises(tpl.TemplateError, match="migration failed: boom"):
        asyncio.run(tpl.save_state(qmp, 5))  # type: ignore[arg-type]


def test_restore_loads_waits_and_continues() -> None:
    qmp = Recorder()
    asyncio.run(tpl.load_state(qmp, 5))  # type: ignore[arg-type]
    assert commands(qmp) == ["getfd", "migrate-incoming", "query-status", "query-status", "cont"]


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
        tpl.write_meta(d, tpl.Template(
            argv=tpl.shape(qemu_config, template_vm._device_params()),
            files=tpl.file_ids(qemu_config), created=1.0, boot_seconds=1.0, save_seconds=1.0,
            state_bytes=5, vcpus=1, memory_mib=256))
    why, template = vm_of(VmSpec("pod", tmp / "pod", vcpus=vcpus, memory_mib=memory,
                                 template_dir=d)).template_fit(d)
    assert (why is None) == (template is not None)
    return why


def test_a_pod_grows_from_the_template_only_where_hot_plug_allows(tmp_path: Path) -> None:
    assert fit(tmp_path, 2, 768, memory_slots=2, default_maxvcpus=4) is None
    assert fit(tmp_path, 1, 256, memory_slots=2, default_maxvcpus=4) is None
    why = fit(tmp_path, 1, 768, memory_slots=0, default_maxvcpus=4)
    assert why is not None and "memory_slots = 0 allows no hot-plug" in why
    why = fit(tmp_path, 2, 256, memory_slots=2, default_maxvcpus=0)
    assert why is not None and "needs 2 vCPUs" in why and "default_maxvcpus = 0" in why
    why = fit(tmp_path, 1, 128, memory_slots=2, default_maxvcpus=4)
    assert why is not None and "smaller than the template" in why
