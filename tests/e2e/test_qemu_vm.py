"""Real QEMU VMs (TCG here, KVM where it works) driven through the hypervisor interface
(`hypervisors.qemu.vm.Qemu`): lifecycle, cold-plugged devices with fds passed to QEMU, QMP fd
passing, pause/resume, vCPU hot-plug, and a refused hot-plug.

Needs root (virtiofsd), QEMU, and the guest from `make guest` (build/out/vmlinux and
build/out/initrd.img). For working on hypervisors/ before the guest exists, point
KATA_PY_TEST_KERNEL / KATA_PY_TEST_INITRD at any bootable kernel and initrd.
Every test ends with a leak check: no process mentioning its sandbox id, no socket left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice, VmSpec
from hypervisors.errors import HypervisorError, HypervisorUnsupported, QmpCommandError
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.vm import Qemu
from hypervisors.virtiofsd import lock_file

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
KERNEL = Path(os.environ.get("KATA_PY_TEST_KERNEL", REPO / "build/out/vmlinux"))
INITRD = Path(os.environ.get("KATA_PY_TEST_INITRD", REPO / "build/out/initrd.img"))
CONSOLE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def config() -> QemuConfig:
    missing = [str(p) for p in (KERNEL, INITRD) if not p.is_file()]
    if missing:
        pytest.fail(f"guest image missing: {', '.join(missing)}; run `make guest` first")
    if os.geteuid() != 0:
        pytest.fail("the QEMU e2e tests need root (virtiofsd sandboxing)")
    return QemuConfig(kernel=str(KERNEL), initrd=str(INITRD), default_memory=512,
                      allow_tcg=True)  # these machines have no usable KVM


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


def pid_alive(pid: int | None) -> bool:
    return pid is not None and pid in processes_mentioning("")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    sandbox_id = f"e2e-{uuid.uuid4().hex[:12]}"
    state, shared = tmp_path / "state", tmp_path / "shared"
    shared.mkdir()
    yield sandbox_id, state, shared
    leaked = processes_mentioning(sandbox_id) + processes_mentioning(str(state))
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes leaked by {sandbox_id}: {leaked}"
    assert_no_sockets(state)


def assert_no_sockets(state: Path) -> None:
    left = [p.name for p in state.glob("*") if p.suffix in (".sock", ".pid")]
    assert not left, f"files left in {state}: {left}"
    assert not lock_file(state / "virtiofsd.sock").exists()


async def new_vm(config: QemuConfig, sandbox_id: str, state: Path, shared: Path,
                 memory_mib: int | None = None) -> Qemu:
    """A VM as the sandbox layer makes one: the share cold-plugged. ``memory_mib``: sized
    for a pod (which also reserves memory hot-plug headroom)."""
    vm = Qemu(config, VmSpec(sandbox_id, state, memory_mib=memory_mib))
    await vm.add_device(SharedFsDevice(shared, "virtio-fs", "kataShared"))
    return vm


async def wait_console(vm: Qemu, text: str, timeout: float) -> float:
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while text not in vm.console_log.read_text(errors="replace"):
            await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_start_query_console_stop(config: QemuConfig, sandbox: tuple[str, Path, Path]) -> None:
    sandbox_id, state, shared = sandbox

    async def run() -> None:
        vm = await new_vm(config, sandbox_id, state, shared)
        await vm.start()
        try:
            assert vm.accelerator in ("kvm", "tcg") and vm.accelerator_reason
            assert await vm.qmp.query_status() == "running"
            roles = {r.role: r.pid for r in vm.process_records()}
            assert roles == {"vmm": vm.pid, "virtiofsd": vm.virtiofsd_pid}
            assert processes_mentioning(f"sandbox-{sandbox_id}") == [vm.pid]
            assert vm.agent_address == f"serial://{state}/agent.sock"
            assert vm.paths.agent_socket.is_socket()
            await wait_console(vm, "Linux version", CONSOLE_TIMEOUT)
        finally:
            await vm.stop()
        assert not pid_alive(vm.pid) and not pid_alive(vm.virtiofsd_pid)
        assert vm.console_log.is_file()
        await vm.stop()  # idempotent

    asyncio.run(run())


def test_bad_kernel_path(config: QemuConfig, sandbox: tuple[str, Path, Path]) -> None:
    sandbox_id, state, shared = sandbox
    bad = replace(config, kernel="/nonexistent/vmlinuz-e2e")

    async def run() -> None:
        vm = await new_vm(bad, sandbox_id, state, shared)
        with pytest.raises(HypervisorError, match="/nonexistent/vmlinuz-e2e") as info:
            await vm.start()
        assert "failed to start QEMU" in str(info.value)
        assert not pid_alive(vm.pid) and not pid_alive(vm.virtiofsd_pid)
        await vm.stop()  # nothing to do, no error

    asyncio.run(run())


def test_qemu_killed_midflight(config: QemuConfig, sandbox: tuple[str, Path, Path]) -> None:
    sandbox_id, state, shared = sandbox

    async def run() -> None:
        vm = await new_vm(config, sandbox_id, state, shared)
        await vm.start()
        try:
            assert vm.pid is not None
            os.kill(vm.pid, signal.SIGKILL)
            code = await asyncio.wait_for(vm.wait_exited(), 10)
            assert code == -signal.SIGKILL
        finally:
            await vm.stop()
        assert not pid_alive(vm.virtiofsd_pid)

    asyncio.run(run())


def test_virtiofsd_failure_leaves_nothing(
    config: QemuConfig, sandbox: tuple[str, Path, Path], tmp_path: Path
) -> None:
    sandbox_id, state, shared = sandbox
    daemon = tmp_path / "fake-virtiofsd"
    daemon.write_text("#!/bin/sh\necho 'fake: cannot serve' >&2\nexit 7\n")
    daemon.chmod(0o755)
    bad = replace(config, virtio_fs_daemon=str(daemon))

    async def run() -> None:
        vm = await new_vm(bad, sandbox_id, state, shared)
        with pytest.raises(HypervisorError, match="exited with 7") as info:
            await vm.start()
        assert "fake: cannot serve" in str(info.value)
        assert vm.pid is None  # QEMU never spawned

    asyncio.run(run())


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.06])
def test_cancelled_start_leaves_nothing(
    config: QemuConfig, sandbox: tuple[str, Path, Path], delay: float
) -> None:
    sandbox_id, state, shared = sandbox

    async def run() -> None:
        vm = await new_vm(config, sandbox_id, state, shared)
        task = asyncio.create_task(vm.start())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:  # start won the race; stopping must clean up just the same
            await vm.stop()
        assert not pid_alive(vm.pid) and not pid_alive(vm.virtiofsd_pid)

    asyncio.run(run())


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def open_tap(name: str) -> int:
    """A non-persistent tap: it goes away when the last fd (ours, QEMU's) closes."""
    import fcntl
    import struct

    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def test_cold_plugged_nic_and_disk_reach_qemu(
    config: QemuConfig, sandbox: tuple[str, Path, Path], tmp_path: Path
) -> None:
    sandbox_id, state, shared = sandbox
    tap_name = f"kpyt{uuid.uuid4().hex[:8]}"
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))

    async def run() -> None:
        vm = await new_vm(config, sandbox_id, state, shared)
        tap = open_tap(tap_name)
        try:
            await vm.add_device(NetworkDevice("eth0", "02:42:ac:11:00:02", 1400, (tap,)))
            await vm.add_device(BlockDevice("d0", disk, readonly=True))
            await vm.start()
        finally:
            os.close(tap)  # QEMU holds its own copy now
        try:
            nics = await vm.qmp.execute("query-rx-filter", {"name": "eth0"})
            assert nics[0]["main-mac"] == "02:42:ac:11:00:02"
            nodes = await vm.qmp.execute("query-named-block-nodes")
            node = next(n for n in nodes if n["node-name"] == "drive-d0")
            assert node["ro"] is True and node["file"] == str(disk)
        finally:
            await vm.stop()
        assert not Path(f"/sys/class/net/{tap_name}").exists(), "the tap outlived QEMU"

    asyncio.run(run())


def test_pause_resume_vcpus_memory_fd_passing_and_no_block_hot_plug(
    config: QemuConfig, sandbox: tuple[str, Path, Path], tmp_path: Path
) -> None:
    sandbox_id, state, shared = sandbox
    two = replace(config, default_maxvcpus=2, memory_slots=10)

    async def run() -> None:
        vm = await new_vm(two, sandbox_id, state, shared, memory_mib=two.default_memory)
        await vm.start()
        try:
            mark = vm.qmp.events.mark()
            await vm.pause()
            assert await vm.qmp.query_status() == "paused"
            await vm.qmp.events.wait_for({"STOP"}, 5, after=mark)
            await vm.resume()
            assert await vm.qmp.query_status() == "running"
            await vm.qmp.events.wait_for({"RESUME"}, 5, after=mark)

            assert await vm.resize_vcpus(2) == 2
            assert len(await vm.qmp.execute("query-cpus-fast")) == 2
            with pytest.raises(HypervisorError, match="allowed 1-2"):
                await vm.resize_vcpus(3)

            with open(tmp_path / "probe", "wb") as probe:  # QEMU takes a copy of the fd
                await vm.qmp.get_fd("probe", probe.fileno())
            await vm.qmp.execute("closefd", {"fdname": "probe"})  # known: it was received
            with pytest.raises(QmpCommandError, match="probe"):
                await vm.qmp.execute("closefd", {"fdname": "probe"})

            with pytest.raises(HypervisorUnsupported, match="hot-plug"):
                await vm.add_device(BlockDevice("late", tmp_path / "probe"))
            boot = two.default_memory
            assert await vm.resize_memory(boot + 200) == boot + 256  # a 128 MiB-aligned DIMM
            dimms = await vm.qmp.execute("query-memory-devices")
            assert [d["data"]["size"] for d in dimms] == [256 << 20], dimms
            assert await vm.resize_memory(boot) == boot + 256  # never shrinks
            with pytest.raises(HypervisorError, match="reserved"):
                await vm.resize_memory(1 << 30)
        finally:
            await vm.stop()

    asyncio.run(run())


def test_qemu_runs_under_its_seccomp_sandbox(config: QemuConfig,
                                             sandbox: tuple[str, Path, Path]) -> None:
    sandbox_id, state, shared = sandbox

    async def run() -> None:
        vm = await new_vm(config, sandbox_id, state, shared)
        await vm.start()
        try:
            status = Path(f"/proc/{vm.pid}/status").read_text()
            assert "\nSeccomp:\t2\n" in status  # a seccomp filter is installed
            assert "\nNoNewPrivs:\t1\n" in status
            # virtiofsd serves from a child in its namespace sandbox, under seccomp too.
            served = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                      and f"\nPPid:\t{vm.virtiofsd_pid}\n" in _status(p)]  # fmt: skip
            assert served and all("\nSeccomp:\t2\n" in _status(Path(f"/proc/{pid}"))
                                  for pid in served), served  # fmt: skip
        finally:
            await vm.stop()

    asyncio.run(run())


def test_tcg_is_refused_unless_allowed(config: QemuConfig,
                                       sandbox: tuple[str, Path, Path]) -> None:
    sandbox_id, state, shared = sandbox
    from hypervisors.errors import HypervisorRefused

    async def run() -> None:
        vm = await new_vm(replace(config, accelerator="tcg", allow_tcg=False), sandbox_id,
                          state, shared)  # fmt: skip
        with pytest.raises(HypervisorRefused, match="allow_tcg = true"):
            await vm.start()
        assert vm.pid is None
        await vm.stop()

    asyncio.run(run())


def _status(proc_dir: Path) -> str:
    try:
        return (proc_dir / "status").read_text()
    except OSError:
        return ""
