"""The VM cache's daemon and the shim's claim (`hypervisors.qemu.vmcache`), with fake VMs
(sleeping processes, and a stand-in for their holder's owner socket) over the real socket:
describe, claim, the exit status reaching the shim, a replacement booting, a VM handed out
outliving the cache, refusals, stop, and what a killed cache leaves for the next. The
holder itself: tests/unit/test_hostos_holder.py."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hostos.procs import start_time
from hypervisors import vmcache_control
from hypervisors.base import VmSpec
from hypervisors.errors import HypervisorError
from hypervisors.qemu import template as tpl
from hypervisors.qemu import vmcache

MARK = "agent serving"


class FakeVm:
    """What `VmCache` asks of a cached `Qemu`: a sleeping process and a console log."""

    def __init__(self, spec: VmSpec, gate: asyncio.Event | None) -> None:
        self.spec, self.gate = spec, gate
        self.console_log = spec.state_dir / "console.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.stopped = self.released = False
        self.accelerator, self.accelerator_reason = "tcg", "no KVM here"
        self._console_peer: socket.socket | None = None
        self._holder: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.proc = await asyncio.create_subprocess_exec("sleep", "60")
        self.console_log.write_text(f"Linux\n{MARK}\n")

    def booted(self) -> None:
        pass

    async def wait_exited(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def cache_shape(self, boot_seconds: float) -> tpl.Template:
        return tpl.Template(argv=["qemu", "-m", "256"], files={}, vcpus=1, memory_mib=256,
                            created=0.0, boot_seconds=boot_seconds, save_seconds=0.0,
                            state_bytes=0)

    async def release_for_adoption(self) -> tuple[int, int]:
        """As the holder (hostos/holder.c) does on its side: the VM's exit status to the owner."""
        self.released = True
        owner, holder_end = socket.socketpair()
        console, self._console_peer = socket.socketpair()
        self._holder = asyncio.ensure_future(self._hold(holder_end))
        return owner.detach(), console.detach()

    async def _hold(self, end: socket.socket) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        end.sendall(f'{{"exited": {code}}}\n'.encode())
        end.close()

    async def stop(self) -> None:
        """A VM handed out is not ours to end (`VmmVm.stop` after the hand-over)."""
        self.stopped = True
        if not self.released and self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def end(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        if self._console_peer is not None:
            self._console_peer.close()


class Harness:
    def __init__(self, tmp_path: Path, count: int = 1) -> None:
        self.endpoint = tmp_path / "cache.sock"
        self.vms: list[FakeVm] = []
        self.gates: list[asyncio.Event] = []  # the Nth VM's start waits for gates[N] if set
        spec = VmSpec("vm-cache", tmp_path)
        self.cache = vmcache.VmCache(Any, spec, count, self.endpoint, MARK, self._make,  # type: ignore[arg-type]
                                     parallel=2)
        self.stop = asyncio.Event()
        self.alive_after_stop: list[FakeVm] = []

    def _make(self, _config: object, spec: VmSpec) -> FakeVm:
        gate = self.gates[len(self.vms)] if len(self.vms) < len(self.gates) else None
        vm = FakeVm(spec, gate)
        self.vms.append(vm)
        return vm

    async def until(self, what: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not what():
                await asyncio.sleep(0.02)


def run(tmp_path: Path, body: Callable[[Harness], Awaitable[None]], count: int = 1,
        gates: int = 0) -> Harness:
    async def main() -> Harness:
        h = Harness(tmp_path, count)
        h.gates = [asyncio.Event() for _ in range(gates)]
        served = asyncio.ensure_future(h.cache.run(h.stop))
        try:
            await h.until(lambda: h.endpoint.exists() or served.done())
            await body(h)
        finally:
            h.stop.set()
            await asyncio.wait_for(served, 20)
            h.alive_after_stop = [vm for vm in h.vms
                                  if vm.proc is not None and vm.proc.returncode is None]
            for vm in h.vms:
                vm.end()
        return h

    return asyncio.run(main())


def fits(_shape: tpl.Template) -> str | None:
    return None


def test_a_pod_takes_a_ready_vm_learns_its_exit_and_a_replacement_boots(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.until(lambda: len(h.cache.ready) == 1)
        lease = await vmcache.claim(h.endpoint, "pod1", fits)
        assert lease is not None
        first = h.vms[0]
        assert first.released and lease.claimed.pid == first.pid
        assert lease.claimed.start_time == start_time(lease.claimed.pid)
        assert lease.claimed.dir == str(tmp_path / "cache.sock.d" / "vm-1")
        assert lease.console_fd is not None and lease.shape.memory_mib == 256
        await h.until(lambda: len(h.vms) == 2 and len(h.cache.ready) == 1)  # a replacement
        assert first.proc is not None
        first.proc.kill()  # the VM dies under the pod: its status reaches the shim
        assert await asyncio.wait_for(lease.process.wait(), 5) == -9
        await lease.close()
        await h.until(lambda: first.stopped and not Path(lease.claimed.dir).exists())

    h = run(tmp_path, body)
    assert all(vm.stopped for vm in h.vms)  # the unclaimed one too, at stop
    assert not h.endpoint.exists() and not (tmp_path / "cache.sock.d").exists()


def test_a_vm_handed_out_outlives_the_cache(tmp_path: Path) -> None:
    """Its pod owns it now: the cache stopping stops only the VMs nobody took."""
    async def body(h: Harness) -> None:
        await h.until(lambda: len(h.cache.ready) == 1)
        lease = await vmcache.claim(h.endpoint, "pod1", fits)
        assert lease is not None
        await h.until(lambda: len(h.cache.ready) == 1)
        described = await asyncio.to_thread(vmcache_control.ask, h.endpoint, "describe")
        assert described["claimed"] == 1, described
        await lease.close()  # the pod's shim lets go (the real holder would kill the VM)

    h = run(tmp_path, body)
    assert h.alive_after_stop == [h.vms[0]]  # the replacement was stopped, not the pod's
    assert h.vms[0].released and not (tmp_path / "cache.sock.d").exists()


def test_a_pod_that_does_not_fit_or_finds_none_ready_gets_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")

    async def body(h: Harness) -> None:
        h.gates[0].set()
        await h.until(lambda: len(h.cache.ready) == 1)
        assert await vmcache.claim(h.endpoint, "big", lambda _: "the VM is too big") is None
        assert len(h.cache.ready) == 1  # still there for the next pod
        lease = await vmcache.claim(h.endpoint, "pod1", fits)
        assert lease is not None  # the replacement now waits at its gate
        assert await vmcache.claim(h.endpoint, "pod2", fits) is None
        h.gates[1].set()
        await lease.close()

    run(tmp_path, body, gates=2)
    assert "VM big boots: the VM cache's VMs do not fit it: the VM is too big" in caplog.text
    assert "VM pod2 boots: the VM cache has no VM for it: all 1 VMs are taken" in caplog.text


def test_replacements_boot_side_by_side(tmp_path: Path) -> None:
    """A cache of two fills both places at once (``parallel``), not one after the other."""
    async def body(h: Harness) -> None:
        await h.until(lambda: len(h.vms) == 2)  # both started while neither has booted
        assert not h.cache.ready
        for gate in h.gates:
            gate.set()
        await h.until(lambda: len(h.cache.ready) == 2)

    h = run(tmp_path, body, count=2, gates=2)
    assert len(h.vms) == 2


def test_no_cache_means_a_boot_and_a_stop_request_drains(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    missing = asyncio.run(vmcache.claim(tmp_path / "none.sock", "pod1", fits))
    assert missing is None and "no VM from the VM cache" in caplog.text

    async def body(h: Harness) -> None:
        await h.until(lambda: len(h.cache.ready) == 2)
        described = await asyncio.to_thread(vmcache_control.ask, h.endpoint, "describe")
        assert (described["ok"], described["ready"], described["count"], described["claimed"]) \
            == (True, 2, 2, 0)
        assert (await asyncio.to_thread(vmcache_control.ask, h.endpoint, "stop"))["ok"]
        await h.until(lambda: all(vm.stopped for vm in h.vms))

    h = run(tmp_path, body, count=2)
    assert len(h.vms) == 2


def test_one_cache_per_endpoint_and_a_killed_ones_leftovers_go(tmp_path: Path) -> None:
    stale = tmp_path / "cache.sock.d" / "vm-7"
    stale.mkdir(parents=True)
    (stale / "console.log").write_text("old")

    async def body(h: Harness) -> None:
        assert not stale.exists()
        other = vmcache.VmCache(Any, VmSpec("x", tmp_path), 1, h.endpoint, MARK,  # type: ignore[arg-type]
                                lambda *_: None)
        with pytest.raises(HypervisorError, match="a VM cache already serves"):
            await other.run(asyncio.Event())
        assert os.stat(h.endpoint).st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "cache.sock.d").st_mode & 0o777 == 0o700

    run(tmp_path, body)


def test_the_shim_moves_only_the_sockets_of_the_caches_own_vm_dirs(tmp_path: Path) -> None:
    from hypervisors.statepaths import StatePaths
    from hypervisors.vmcache_wire import Claimed

    cache_dir = tmp_path / "c.sock.d"
    vm_dir = cache_dir / "vm-3"
    vm_dir.mkdir(parents=True)
    for name in ("qmp.sock", "agent.sock"):
        (vm_dir / name).write_text("")
    pod = StatePaths(tmp_path / "pod")
    pod.state_dir.mkdir()
    vmcache.move_sockets(cache_dir, Claimed(1, 1, str(vm_dir), "tcg", ""), pod)
    assert pod.qmp_socket.exists() and pod.agent_socket.exists()
    assert not (vm_dir / "qmp.sock").exists()
    for bad in (tmp_path / "elsewhere", cache_dir / "vm-3" / "..", cache_dir / "x"):
        with pytest.raises(HypervisorError, match="not one of its own directories"):
            vmcache.move_sockets(cache_dir, Claimed(1, 1, str(bad), "tcg", ""), pod)


def test_a_cache_without_its_holder_program_refuses_to_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Said once at the start, not at every VM's boot."""
    import sys

    from hypervisors.qemu.config import QemuConfig
    from hypervisors.qemu.vm import serve_vm_cache

    for name in ("vmlinuz", "initrd.img"):
        (tmp_path / name).write_bytes(b"guest")
    config = QemuConfig(kernel=str(tmp_path / "vmlinuz"), initrd=str(tmp_path / "initrd.img"),
                        path="/bin/true", memory_slots=2)
    spec = VmSpec("cache", tmp_path / "vm", vcpus=1, memory_mib=256)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    with pytest.raises(HypervisorError, match=r"kata-vm-holder is missing.*make venv"):
        asyncio.run(asyncio.wait_for(serve_vm_cache(
            config, spec, 1, tmp_path / "c.sock", "mark", asyncio.Event()), 10))
    assert not (tmp_path / "c.sock").exists()


def test_a_killed_caches_leftovers_are_removed_unless_a_cache_serves(tmp_path: Path) -> None:
    """`kata-runtime factory destroy` with no cache serving: its socket, VM directories,
    lock and directory go; a link among them is removed, never followed."""
    endpoint = tmp_path / "cache.sock"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file")

    def leave_a_killed_cache() -> None:
        (vmcache.vm_dirs(endpoint) / "vm-3").mkdir(parents=True)
        (vmcache.vm_dirs(endpoint) / "vm-3" / "console.log").write_text("old")
        (vmcache.vm_dirs(endpoint) / vmcache.LOCK_FILE).write_text("")
        with socket.socket(socket.AF_UNIX) as dead:  # bound, nobody listens any more
            dead.bind(str(endpoint))

    leave_a_killed_cache()
    (vmcache.vm_dirs(endpoint) / "vm-9").symlink_to(outside)
    assert vmcache.remove_leftovers(endpoint) is True
    assert not endpoint.exists() and (outside / "keep").read_text() == "host file"
    assert os.listdir(vmcache.vm_dirs(endpoint)) == ["vm-9"]  # the link stays, and its dir
    (vmcache.vm_dirs(endpoint) / "vm-9").unlink()
    assert vmcache.remove_leftovers(endpoint) is True
    assert not vmcache.vm_dirs(endpoint).exists()
    assert vmcache.remove_leftovers(endpoint) is False  # nothing left

    async def body(h: Harness) -> None:
        assert vmcache.remove_leftovers(h.endpoint) is False  # a cache serves: its own
        assert h.endpoint.is_socket() and vmcache.vm_dirs(h.endpoint).is_dir()

    run(tmp_path, body)
