"""`Stratovirt` driven for real against the fake stratovirt (tests/harness/stratovirt_peer.py):
lifecycle, QMP handshake and query-status in StratoVirt's dialect, quit with the kill
fallback, a VMM dying at start-up, the KVM refusal, hot-plug commands and StratoVirt's error
replies as typed errors, and no process or socket left behind. The KVM probe is replaced
(this machine has no KVM); nothing else is."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hypervisors.accel import AccelChoice
from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice, VmSpec
from hypervisors.errors import (
    HypervisorError,
    HypervisorRefused,
    HypervisorUnsupported,
    QmpCommandError,
    QmpError,
)
from hypervisors.qmp import QEMU_DIALECT, QmpClient, QmpDialect
from hypervisors.stratovirt import vm as stratovirt_vm
from hypervisors.stratovirt.config import StratovirtConfig
from hypervisors.stratovirt.vm import STRATOVIRT_QMP, Stratovirt
from tests.harness.stratovirt_peer import (
    Behaviour,
    QmpPeer,
    listen,
    write_fake_stratovirt,
    write_fake_virtiofsd,
)

KVM = AccelChoice("kvm", "kvm: test stand-in (this host has no KVM)")


@pytest.fixture(autouse=True)
def host(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM 'works', and no /dev/vhost-vsock (unless a test says otherwise)."""
    monkeypatch.setattr(stratovirt_vm, "choose_accelerator", lambda: KVM)
    monkeypatch.setattr(stratovirt_vm, "host_has_vhost_vsock", lambda: False)


class Setup:
    """A sandbox id, its state directory, a kernel, and the fake's record directory."""

    def __init__(self, root: Path) -> None:
        self.id = f"sv-{uuid.uuid4().hex[:10]}"
        self.root = root
        self.state = root / "state"
        self.record = root / "record"
        self.record.mkdir()
        self.kernel = root / "vmlinuz"
        self.kernel.write_bytes(b"kernel")

    def vm(self, behaviour: Behaviour | None = None, **config: Any) -> Stratovirt:
        behaviour = behaviour or Behaviour()
        behaviour.record_dir = str(self.record)
        fake = write_fake_stratovirt(self.root / "stratovirt", behaviour)
        settings: dict[str, Any] = {"path": str(fake), "kernel": str(self.kernel),
                                    "initrd": "", "shared_fs": "none", "default_memory": 256}
        settings.update(config)
        return Stratovirt(StratovirtConfig(**settings), VmSpec(self.id, self.state))

    def argv(self) -> list[str]:
        return list(json.loads((self.record / "argv.json").read_text()))

    def qmp_log(self) -> list[dict[str, Any]]:
        text = (self.record / "qmp.log").read_text()
        return [json.loads(line) for line in text.splitlines()]


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """Every test ends with the leak check: no process of its VM, no socket or pid file."""
    s = Setup(tmp_path)
    yield s
    leaked = processes_mentioning(s.id) + processes_mentioning(str(s.root / "virtiofsd"))
    assert not leaked, f"processes leaked: {leaked}"
    left = [p.name for p in s.state.glob("*") if p.suffix in (".sock", ".pid")]
    assert not left, f"files left in {s.state}: {left}"


# -- lifecycle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("greeting", ["qmp.md", "cpu_hotplug.md"])
def test_start_status_pause_resume_stop(setup: Setup, greeting: str) -> None:
    """Both documented greetings; qmp_capabilities answered without an id; query-status,
    stop/cont (qmp.md Lifecycle Management); quit; the console copied; nothing left."""

    async def run() -> None:
        vm = setup.vm(Behaviour(greeting=greeting))
        await vm.start()
        try:
            assert vm.pid is not None and vm.accelerator == "kvm"
            assert (setup.state / "vmm.pid").read_text().strip() == str(vm.pid)
            assert [r.role for r in vm.process_records()] == ["vmm"]
            assert vm.agent_address == f"serial://{setup.state}/agent.sock"
            assert await vm.query_status() == "running"
            await vm.pause()
            assert await vm.query_status() == "paused"
            await vm.resume()
            assert await vm.query_status() == "running"
            for _ in range(100):
                if "booting" in vm.console_log.read_text(errors="replace"):
                    break
                await asyncio.sleep(0.02)
            assert f"sandbox-{setup.id} booting" in vm.console_log.read_text()
        finally:
            await vm.stop()
        assert vm._proc is not None and vm._proc.returncode == 0  # it quit when asked
        await vm.stop()  # idempotent
        assert vm.process_records() == []

    asyncio.run(run())
    commands = [c["execute"] for c in setup.qmp_log()]
    assert commands == ["qmp_capabilities", "query-status", "stop", "query-status", "cont",
                        "query-status", "quit"]
    argv = setup.argv()
    assert "-daemonize" not in argv and "-pidfile" in argv


@pytest.mark.parametrize("quit", ["ignore", "hang"])
def test_kill_when_quit_is_ignored(setup: Setup, quit: str) -> None:
    """A VMM that answers quit and stays, or never answers: SIGKILL after the timeout."""

    async def run() -> None:
        vm = setup.vm(Behaviour(quit=quit))
        await vm.start()
        await vm.stop(timeout=0.3)
        assert vm._proc is not None and vm._proc.returncode == -9

    asyncio.run(run())


def test_a_vmm_dying_at_start_up_is_reported_with_its_stderr(setup: Setup) -> None:
    async def run() -> None:
        vm = setup.vm(kernel=str(setup.root / "missing-vmlinuz"))
        with pytest.raises(HypervisorError) as info:
            await vm.start()
        message = str(info.value)
        assert message.startswith(f"failed to start StratoVirt for {setup.id}: exited with "
                                  "code 1; stderr:\n")
        assert "Failed to open kernel image" in message and "missing-vmlinuz" in message
        await vm.stop()  # nothing to stop: still fine

    asyncio.run(run())


def test_a_scripted_start_up_failure(setup: Setup) -> None:
    async def run() -> None:
        vm = setup.vm(Behaviour(fail_at_start="KVM_CREATE_VM failed: Device or resource busy"))
        with pytest.raises(HypervisorError, match="stderr:\nError: KVM_CREATE_VM failed"):
            await vm.start()

    asyncio.run(run())


def test_without_kvm_start_refuses_before_spawning(setup: Setup,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kvm() -> AccelChoice:
        raise HypervisorError("failed to use accelerator kvm: cannot open /dev/kvm: No such "
                              "file or directory")

    monkeypatch.setattr(stratovirt_vm, "choose_accelerator", no_kvm)

    async def run() -> None:
        vm = setup.vm()
        with pytest.raises(HypervisorRefused) as info:
            await vm.start()
        assert "StratoVirt runs only on KVM" in str(info.value)
        assert "cannot open /dev/kvm" in str(info.value)
        assert vm.pid is None

    asyncio.run(run())
    assert not (setup.record / "argv.json").exists()  # never spawned


def test_vsock_when_the_host_has_it(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stratovirt_vm, "host_has_vhost_vsock", lambda: True)

    async def run() -> None:
        vm = setup.vm()
        await vm.start()
        try:
            assert vm.agent_address.startswith("vsock://")
        finally:
            await vm.stop()
        off = setup.vm(use_vsock=False)
        await off.start()
        try:
            assert off.agent_address.startswith("serial://")
        finally:
            await off.stop()

    asyncio.run(run())


def test_virtio_fs_with_virtiofsd(setup: Setup) -> None:
    """virtiofsd started first, StratoVirt connects to it (2.17.1), both stopped."""
    daemon = write_fake_virtiofsd(setup.root / "virtiofsd")
    shared = setup.root / "shared"
    shared.mkdir()

    async def run() -> None:
        vm = setup.vm(shared_fs="virtio-fs", virtio_fs_daemon=str(daemon))
        await vm.add_device(SharedFsDevice(shared, "virtio-fs", "kataShared"))
        await vm.start()
        try:
            roles = {r.role: r.pid for r in vm.process_records()}
            assert roles == {"vmm": vm.pid, "virtiofsd": vm.virtiofsd_pid}
        finally:
            await vm.stop()

    asyncio.run(run())
    assert "microvm,dump-guest-core=off,mem-share=on" in setup.argv()


def test_a_9p_share_is_refused(setup: Setup) -> None:
    async def run() -> None:
        with pytest.raises(HypervisorUnsupported, match="virtio-fs only"):
            await setup.vm().add_device(SharedFsDevice(setup.root, "virtio-9p", "t"))

    asyncio.run(run())


# -- hot-plug (qmp.md "Hot plug management") ---------------------------------------------------


def test_hotplug_disks_and_a_nic(setup: Setup) -> None:
    disk0, disk1 = setup.root / "d0.img", setup.root / "d1.img"
    disk0.write_bytes(b"0")
    disk1.write_bytes(b"1")
    read, write = os.pipe()  # stands in for a tap fd: getfd only needs a descriptor

    async def run() -> None:
        vm = setup.vm()
        await vm.start()
        try:
            await vm.add_device(BlockDevice("vol0", disk0))
            await vm.add_device(BlockDevice("vol1", disk1, readonly=True))
            await vm.add_device(NetworkDevice("eth1", "02:00:00:00:00:09", 1500, (read,)))
            await vm.remove_device("vol0")
            await vm.add_device(BlockDevice("vol2", disk0))  # reuses the freed slot 0
        finally:
            await vm.stop()

    try:
        asyncio.run(run())
    finally:
        os.close(read)
        os.close(write)
    log = [(c["execute"], c.get("arguments", {})) for c in setup.qmp_log()]
    plugs = [entry for entry in log if entry[0] not in ("qmp_capabilities", "quit")]
    assert plugs == [
        ("blockdev-add", {"node-name": "vol0", "read-only": False, "cache": {"direct": False},
                          "file": {"driver": "file", "filename": str(disk0), "aio": "off"}}),
        ("device_add", {"id": "vol0", "driver": "virtio-blk-mmio", "addr": "0x0",
                        "drive": "vol0"}),
        ("blockdev-add", {"node-name": "vol1", "read-only": True, "cache": {"direct": False},
                          "file": {"driver": "file", "filename": str(disk1), "aio": "off"}}),
        ("device_add", {"id": "vol1", "driver": "virtio-blk-mmio", "addr": "0x1",
                        "drive": "vol1"}),
        ("getfd", {"fdname": "fd-eth1"}),
        ("netdev_add", {"id": "eth1", "fds": "fd-eth1"}),
        ("device_add", {"id": "eth1", "driver": "virtio-net-mmio", "addr": "0x0",
                        "netdev": "eth1", "chardev": "eth1", "mac": "02:00:00:00:00:09"}),
        ("device_del", {"id": "vol0"}),
        ("blockdev-add", {"node-name": "vol2", "read-only": False, "cache": {"direct": False},
                          "file": {"driver": "file", "filename": str(disk0), "aio": "off"}}),
        ("device_add", {"id": "vol2", "driver": "virtio-blk-mmio", "addr": "0x0",
                        "drive": "vol2"}),
    ]


def test_stratovirt_errors_become_typed_errors(setup: Setup) -> None:
    """A GenericError reply is a QmpCommandError inside a HypervisorError naming the device;
    the half-plugged backend is rolled back with device_del."""
    disk = setup.root / "d.img"
    disk.write_bytes(b"d")

    async def run() -> None:
        vm = setup.vm(Behaviour(errors={"device_add": "The slot 0 is occupied already."}))
        await vm.start()
        try:
            with pytest.raises(HypervisorError) as info:
                await vm.add_device(BlockDevice("vol0", disk))
            assert str(info.value).startswith(f"failed to hot-plug disk vol0 into VM {setup.id}")
            cause = info.value.__cause__
            assert isinstance(cause, QmpCommandError)
            assert (cause.command, cause.error_class, cause.desc) == (
                "device_add", "GenericError", "The slot 0 is occupied already.")
            with pytest.raises(HypervisorError, match="No such file or directory"):
                await vm.add_device(BlockDevice("vol1", setup.root / "missing.img"))
            with pytest.raises(HypervisorError, match="it was not hot-plugged"):
                await vm.remove_device("vol0")
            assert await vm.query_status() == "running"  # the connection survived
        finally:
            await vm.stop()

    asyncio.run(run())
    commands = [c["execute"] for c in setup.qmp_log()]
    assert commands[1:5] == ["blockdev-add", "device_add", "device_del", "blockdev-add"]


def test_what_stratovirt_cannot_hotplug(setup: Setup) -> None:
    async def run() -> None:
        vm = setup.vm()
        await vm.start()
        try:
            nic = NetworkDevice("eth1", "02:00:00:00:00:09", 1500, (5, 6))
            with pytest.raises(HypervisorUnsupported, match="one tap queue"):
                await vm.add_device(nic)
            with pytest.raises(HypervisorUnsupported, match="only virtio-blk and virtio-net"):
                await vm.add_device(SharedFsDevice(setup.root, "virtio-fs", "x"))
            with pytest.raises(HypervisorUnsupported, match=r"cpu_hotplug\.md"):
                await vm.resize_vcpus(2)
            assert await vm.resize_vcpus(1) == 1
            with pytest.raises(HypervisorUnsupported, match="no memory hot-plug"):
                await vm.resize_memory(512)
            assert await vm.resize_memory(128) == 256
        finally:
            await vm.stop()

    asyncio.run(run())


# -- the QMP dialect against the in-process peer ------------------------------------------------


class Served:
    """`QmpPeer` on a unix socket in a thread."""

    def __init__(self, path: Path, behaviour: Behaviour | None = None) -> None:
        self.peer = QmpPeer(behaviour or Behaviour())
        self.stop = threading.Event()
        self.listener = listen(str(path))
        self.thread = threading.Thread(target=self.peer.serve, args=(self.listener, self.stop))
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def test_qemus_dialect_cannot_talk_to_stratovirt(tmp_path: Path) -> None:
    """StratoVirt's reply to qmp_capabilities has no id: QEMU's strict matching fails."""
    served = Served(tmp_path / "q.sock")

    async def run() -> None:
        with pytest.raises(QmpError, match="unknown id None"):
            await QmpClient.connect(tmp_path / "q.sock", timeout=5, dialect=QEMU_DIALECT)

    try:
        asyncio.run(run())
    finally:
        served.close()


def test_without_one_at_a_time_a_slow_stratovirt_sees_two_commands_in_one_read(
        tmp_path: Path) -> None:
    """Why the dialect serialises: StratoVirt parses a read as one message."""
    served = Served(tmp_path / "q.sock", Behaviour(read_delay=0.05))

    async def run() -> None:
        loose = QmpDialect(untagged_replies=True)
        client = await QmpClient.connect(tmp_path / "q.sock", timeout=5, dialect=loose)
        try:
            await asyncio.gather(*(client.query_status(timeout=2) for _ in range(5)),
                                 return_exceptions=True)
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        served.close()
    assert served.peer.bad_reads


def test_stratovirts_dialect_one_command_at_a_time(tmp_path: Path) -> None:
    """Commands issued together reach StratoVirt one per read (it parses a read as one
    message), and an id-less error answers the command that caused it."""
    served = Served(tmp_path / "q.sock", Behaviour(read_delay=0.01))

    async def run() -> None:
        client = await QmpClient.connect(tmp_path / "q.sock", timeout=5, dialect=STRATOVIRT_QMP)
        try:
            statuses = await asyncio.gather(*(client.query_status() for _ in range(20)))
            assert statuses == ["running"] * 20
            with pytest.raises(QmpCommandError, match="unknown field `bogus`"):
                await client.execute("query-status", {"bogus": 1})
            assert await client.query_status() == "running"
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        served.close()
    assert served.peer.bad_reads == []
    assert len(served.peer.commands) == 23


# -- kata-runtime check ---------------------------------------------------------------------------


def test_host_checks(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files, ``<stratovirt> -V``, KVM (required), the agent channel (informational)."""
    from hypervisors.stratovirt import DRIVER

    fake = write_fake_stratovirt(setup.root / "stratovirt")
    config = StratovirtConfig(path=str(fake), kernel=str(setup.kernel), initrd="",
                              shared_fs="none")
    lines = {c.name: c for c in DRIVER.host_checks(config, "/etc/k.toml")}
    assert lines["StratoVirt version"].ok and lines["StratoVirt version"].detail.startswith(
        "StratoVirt ")
    assert lines["accelerator"].ok and lines["accelerator"].required
    assert not lines["agent channel"].required and "modprobe vhost_vsock" in (
        lines["agent channel"].detail)

    def no_kvm() -> AccelChoice:
        raise HypervisorError("failed to use accelerator kvm: cannot open /dev/kvm")

    monkeypatch.setattr(stratovirt_vm, "choose_accelerator", no_kvm)
    missing = StratovirtConfig(path="/nonexistent/stratovirt", kernel=str(setup.kernel),
                               initrd="", shared_fs="none")
    lines = {c.name: c for c in DRIVER.host_checks(missing, "/etc/k.toml")}
    assert "StratoVirt version" not in lines
    assert not lines["StratoVirt binary (path)"].ok
    assert "/nonexistent/stratovirt does not exist" in lines["StratoVirt binary (path)"].detail
    assert not lines["accelerator"].ok and "runs only on KVM" in lines["accelerator"].detail
