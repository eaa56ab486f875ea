"""Sandbox start and stop with a fake hypervisor and agent: a failure injected at each step
leaves no process, mount or state behind; the lifecycle table, cell by cell."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hostos.procs import process_state
from sandbox.config import FactoryConfig
from sandbox.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    SandboxError,
    UnavailableError,
)
from sandbox.lifecycle import Refusal, missing_cells, transition
from sandbox.sandbox import TRANSITIONS, Sandbox, SandboxOp, SandboxState
from sandbox.state import read_record
from sandbox.storage import mounts_under
from sandbox.types import PodResources, SandboxSpec
from tests.unit.fakes import FakeWorld, fake_sandbox
from ttrpc import Code

SPEC = SandboxSpec(hostname="h1")


def assert_nothing_left(tmp: Path, world: FakeWorld, sandbox: Sandbox) -> None:
    """No fake VMM process, no mount, no state dir, no open agent connection."""
    for vm in world.vms:
        assert vm.pid is None or process_state(vm.pid, None) == "dead", f"VMM {vm.pid} lives"
    assert mounts_under(tmp) == []
    assert not sandbox.state_path.exists(), list(sandbox.state_path.rglob("*"))
    assert not sandbox.state_path.parent.exists(), "the empty namespace dir stayed"
    assert all(agent.closed for agent in world.agents)


def run(body: Callable[[Sandbox, FakeWorld], Awaitable[None]], tmp: Path) -> None:
    world = FakeWorld()
    sandbox = fake_sandbox(tmp, world)

    async def main() -> None:
        try:
            await body(sandbox, world)
        finally:
            await sandbox.stop()

    asyncio.run(main())
    assert_nothing_left(tmp, world, sandbox)


def test_start_then_stop(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        assert sandbox.state is SandboxState.RUNNING
        assert sandbox.vmm_pid == world.vm.pid and process_state(world.vm.pid or 0, None) == "alive"
        assert world.vm.calls == ["add_device", "start", "booted"]
        share = world.vm.devices.devices[0]
        assert (share.kind, share.tag, share.source) == ("virtio-fs", "kataShared",  # type: ignore[union-attr]
                                                          sandbox.shared_dir)  # fmt: skip
        assert [c[0] for c in world.agent.calls] == ["guest_details", "create_sandbox"]
        record = read_record(sandbox.state_path)
        assert record is not None and record.hypervisor == "fake"
        assert record.vmm is not None and record.vmm.pid == world.vm.pid
        assert record.guest_kernel_release == "6.1.0-fake"
        assert (record.kernel, record.initrd) == ("/fake/vmlinuz", "/fake/initrd.img")
        assert sandbox.spec == SPEC and str(sandbox.shared_dir) in mounts_under(tmp_path)
        await sandbox.stop()
        assert sandbox.state is SandboxState.STOPPED
        assert world.agent.calls[-2:] == [("destroy_sandbox",), ("close",)]
        await sandbox.stop()  # idempotent

    run(body, tmp_path)


def test_the_state_dir_names_its_shim_before_anything_goes_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `shim delete` of the id's previous shim, which containerd may still run, cleans
    a state dir with content and no live shim's record: this shim's record comes first."""
    from sandbox import storage

    seen: list[int] = []
    prepare = storage.prepare_share

    def checked(mounts_dir: Path, shared_dir: Path) -> None:
        record = read_record(shared_dir.parent)
        seen.append(record.shim_pid if record is not None else 0)
        prepare(mounts_dir, shared_dir)

    monkeypatch.setattr(storage, "prepare_share", checked)

    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        assert seen == [os.getpid()]

    run(body, tmp_path)


def test_hostname_defaults_to_the_sandbox_id(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SandboxSpec())
        assert ("create_sandbox", "pod") in world.agent.calls

    run(body, tmp_path)


# Each case: what to break, and the error the caller sees.
FAILURES: list[tuple[str, dict[str, Any], type[SandboxError], str]] = [
    ("add the share", {"vm_fail_at": {"add_device"}}, UnavailableError, "add_device"),
    ("start the VM", {"vm_fail_at": {"start"}}, UnavailableError, "failed to start"),
    ("VM dies in start", {"vm_fail_at": {"start-after-spawn"}}, UnavailableError, "after spawn"),
    ("dial the agent", {"connect_error": OSError(111, "refused")}, UnavailableError, "refused"),
    ("agent timeout", {"connect_error": TimeoutError()}, UnavailableError, "within 5s"),
    ("guest details", {"agent_fail_at": {"guest_details"}}, SandboxError, "guest details"),
    ("create sandbox", {"agent_fail_at": {"create_sandbox"}}, SandboxError, "create the sandbox"),
]


@pytest.mark.parametrize(("step", "inject", "error", "words"), FAILURES,
                         ids=[f[0] for f in FAILURES])  # fmt: skip
def test_a_failed_start_step_leaves_nothing(
    tmp_path: Path, step: str, inject: dict[str, Any], error: type[SandboxError], words: str
) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        for name, value in inject.items():
            setattr(world, name, frozenset(value) if isinstance(value, set) else value)
        with pytest.raises(error, match=words):
            await sandbox.start(SPEC)
        assert sandbox.state is SandboxState.NEW
        assert_nothing_left(tmp_path, world, sandbox)
        # Everything was undone: the same sandbox can start once the fault is gone.
        world.vm_fail_at = world.agent_fail_at = frozenset()
        world.connect_error = None
        await sandbox.start(SPEC)
        assert sandbox.state is SandboxState.RUNNING

    run(body, tmp_path)


def test_a_vm_that_exits_while_the_agent_is_dialled(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        async def hang(address: str, timeout: float) -> Any:
            os.kill(world.vm.pid or 0, 9)  # the guest dies while booting
            await asyncio.sleep(60)

        world.connect = hang  # type: ignore[method-assign]
        sandbox._agent_connector = hang  # type: ignore[attr-defined]
        with pytest.raises(UnavailableError, match="the VM exited while booting"):
            await asyncio.wait_for(sandbox.start(SPEC), 10)
        assert_nothing_left(tmp_path, world, sandbox)

    run(body, tmp_path)


def test_a_connection_reset_by_a_dying_vm_says_the_vm_exited(tmp_path: Path) -> None:
    """A guest that stops at boot (the root image's loader failing) resets the agent's
    connection before its exit is seen: the error must still say the VM exited, not that
    the agent did not answer in time."""
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        async def reset(address: str, timeout: float) -> Any:
            os.kill(world.vm.pid or 0, 9)
            raise OSError(104, "Connection reset by peer")

        sandbox._agent_connector = reset  # type: ignore[attr-defined]
        with pytest.raises(UnavailableError, match="the VM exited while booting"):
            await asyncio.wait_for(sandbox.start(SPEC), 10)
        assert_nothing_left(tmp_path, world, sandbox)

    run(body, tmp_path)


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.05])
def test_a_cancelled_start_leaves_nothing(tmp_path: Path, delay: float) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        task = asyncio.ensure_future(sandbox.start(SPEC))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert sandbox.state is SandboxState.NEW
            assert_nothing_left(tmp_path, world, sandbox)
        # else: the start won the race; the final stop must clean up just the same

    run(body, tmp_path)


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.03])
def test_a_cancelled_container_create_leaves_no_share(tmp_path: Path, delay: float) -> None:
    from sandbox.types import ContainerConfig
    from tests.unit.fakes import write_bundle

    bundle = write_bundle(tmp_path / "c1")

    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        config = ContainerConfig("c1", bundle, (), {"root": {"path": "rootfs"}}, False, False)
        task = asyncio.ensure_future(sandbox.create_container(config))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if task.cancelled():
            share = sandbox.shared_dir / "containers" / "c1"
            assert not [m for m in mounts_under(tmp_path) if m.startswith(str(share))]
            assert not share.exists()

    run(body, tmp_path)


def test_a_missing_guest_image_is_refused_before_anything_runs(tmp_path: Path) -> None:
    world = FakeWorld()
    sandbox = fake_sandbox(tmp_path, world, missing_file="/no/vmlinuz")

    async def body() -> None:
        with pytest.raises(InvalidArgumentError, match="/no/vmlinuz does not exist"):
            await sandbox.start(SPEC)

    asyncio.run(body())
    assert world.vms == [] and sandbox.state is SandboxState.NEW
    assert_nothing_left(tmp_path, world, sandbox)


@pytest.mark.parametrize("broken", ["destroy_sandbox", "vm stop"])
def test_a_failing_stop_step_still_leaves_nothing(tmp_path: Path, broken: str) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        if broken == "vm stop":
            world.vm.fail_at = frozenset({"stop"})
            with pytest.raises(UnavailableError, match="failed to stop sandbox pod cleanly"):
                await sandbox.stop()
        else:
            world.agent.fail_at = frozenset({"destroy_sandbox"})
            await sandbox.stop()  # a guest that cannot tidy up is no reason to keep the VM
        assert sandbox.state is SandboxState.STOPPED
        assert_nothing_left(tmp_path, world, sandbox)

    run(body, tmp_path)


def test_calls_need_a_running_sandbox(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        with pytest.raises(UnavailableError, match="failed to use sandbox pod: it is not running"):
            await sandbox.guest.list_pids("c1")
        await sandbox.start(SPEC)
        assert await sandbox.guest.list_pids("c1") == [1, 7]
        with pytest.raises(AlreadyExistsError, match="already running"):
            await sandbox.start(SPEC)
        await sandbox.stop()
        with pytest.raises(UnavailableError):
            await sandbox.guest.list_pids("c1")

    run(body, tmp_path)


def test_agent_errors_keep_their_status_code(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        with pytest.raises(SandboxError) as info:
            await sandbox.remove_container("never-created")
        assert info.value.code is Code.NOT_FOUND

    run(body, tmp_path)


# -- the lifecycle table ----------------------------------------------------------------------

ALLOWED = {
    (SandboxState.NEW, SandboxOp.START): SandboxState.STARTING,
    (SandboxState.NEW, SandboxOp.STOP): SandboxState.STOPPED,
    (SandboxState.STARTING, SandboxOp.STARTED): SandboxState.RUNNING,
    (SandboxState.STARTING, SandboxOp.START_FAILED): SandboxState.NEW,
    (SandboxState.RUNNING, SandboxOp.STOP): SandboxState.STOPPING,
    (SandboxState.RUNNING, SandboxOp.USE): SandboxState.RUNNING,
    (SandboxState.STOPPING, SandboxOp.STOPPED): SandboxState.STOPPED,
    (SandboxState.STOPPED, SandboxOp.START): SandboxState.STARTING,
    (SandboxState.STOPPED, SandboxOp.STOP): SandboxState.STOPPED,
}


def test_every_sandbox_cell_is_listed() -> None:
    assert missing_cells(TRANSITIONS, SandboxState, SandboxOp) == []


@pytest.mark.parametrize(("state", "op"), [(s, o) for s in SandboxState for o in SandboxOp])
def test_sandbox_cell(state: SandboxState, op: SandboxOp) -> None:
    if (state, op) in ALLOWED:
        assert transition(TRANSITIONS, state, op, "sandbox s") is ALLOWED[(state, op)]
        return
    cell = TRANSITIONS[(state, op)]
    assert isinstance(cell, Refusal)
    with pytest.raises(cell.error) as info:
        transition(TRANSITIONS, state, op, "sandbox s")
    assert str(info.value).startswith(f"failed to {op.value} sandbox s: ")
    assert info.value.code in (Code.UNAVAILABLE, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS)
    if op is SandboxOp.USE:
        assert isinstance(info.value, UnavailableError)  # containerd sees the VM is gone
    if op in (SandboxOp.STARTED, SandboxOp.START_FAILED, SandboxOp.STOPPED):
        assert isinstance(info.value, FailedPreconditionError)  # internal steps only


# -- supervision: a VM or agent that dies after boot ends the sandbox at once ----------------


def test_a_vmm_that_dies_after_boot_ends_the_sandbox(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        os.kill(world.vm.pid or 0, 9)
        for _ in range(100):
            if sandbox.state is SandboxState.STOPPED:
                break
            await asyncio.sleep(0.02)
        assert sandbox.state is SandboxState.STOPPED
        assert ("destroy_sandbox",) not in world.agent.calls  # no asking a dead guest
        assert_nothing_left(tmp_path, world, sandbox)

    run(body, tmp_path)


@pytest.mark.parametrize("broken", ["health_check", "health_check_hangs"])
def test_an_agent_that_stops_answering_ends_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    import sandbox.sandbox as module

    monkeypatch.setattr(module, "HEALTH_INTERVAL", 0.01)
    monkeypatch.setattr(module, "HEALTH_TIMEOUT", 0.05)

    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        await asyncio.sleep(0.1)
        assert sandbox.state is SandboxState.RUNNING  # a healthy agent: nothing happens
        world.agent.fail_at = frozenset({broken})
        for _ in range(200):
            if sandbox.state is SandboxState.STOPPED:
                break
            await asyncio.sleep(0.02)
        assert sandbox.state is SandboxState.STOPPED
        assert_nothing_left(tmp_path, world, sandbox)

    run(body, tmp_path)


def test_an_agent_connection_that_ends_ends_the_sandbox(tmp_path: Path) -> None:
    """A guest that breaks the protocol gets its connection dropped by the ttrpc client
    (tests/unit/test_agent_hostile.py); the sandbox must then go at once."""

    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        await world.agent.close()  # what the client does on garbage from the guest
        for _ in range(100):
            if sandbox.state is SandboxState.STOPPED:
                break
            await asyncio.sleep(0.02)
        assert sandbox.state is SandboxState.STOPPED
        assert_nothing_left(tmp_path, world, sandbox)

    run(body, tmp_path)


def test_running_out_of_space_during_create_leaves_no_stuck_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import sandbox.sandbox as module
    from sandbox.types import ContainerConfig
    from tests.unit.fakes import write_bundle

    bundle = write_bundle(tmp_path / "c1")
    config = ContainerConfig("c1", bundle, (), {"root": {"path": "rootfs"}}, False, False)
    real_write = module.write_record

    def full(path: Path, record: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        monkeypatch.setattr(module, "write_record", full)
        with pytest.raises(SandboxError, match="No space left") as info:
            await sandbox.create_container(config)
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        share = sandbox.mounts_dir / "containers" / "c1"
        assert not share.exists() and not storage_mounts(tmp_path, "c1")
        monkeypatch.setattr(module, "write_record", real_write)
        await sandbox.create_container(config)  # the same id works once there is room
        assert storage_mounts(tmp_path, "c1")

    run(body, tmp_path)


def storage_mounts(tmp: Path, cid: str) -> list[str]:
    return [m for m in mounts_under(tmp) if f"/containers/{cid}/" in m]


def test_a_pod_that_grows_gets_vcpus_hot_plugged_within_the_maximum(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        sandbox.config = dataclasses.replace(
            sandbox.config, static_sandbox_resource_mgmt=True,
            hypervisor=dataclasses.replace(sandbox.config.hypervisor, default_maxvcpus=3))
        await sandbox.start(dataclasses.replace(SPEC, resources=PodResources(100000, 100000)))
        assert sandbox.vcpus == 1 and world.vm.spec.vcpus == 1
        await sandbox.fit_vcpus(1)  # no growth: nothing to do
        assert "resize_vcpus" not in world.vm.calls
        await sandbox.fit_vcpus(5)  # more than default_maxvcpus: up to it
        assert sandbox.vcpus == 3 and world.vm.vcpus == 3
        assert ("online_cpus", "3") in world.agent.calls
        await sandbox.fit_vcpus(2)  # never shrinks
        assert world.vm.calls.count("resize_vcpus") == 1

    run(body, tmp_path)


def test_without_static_sizing_the_vm_keeps_its_size(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        await sandbox.fit_vcpus(4)
        assert "resize_vcpus" not in world.vm.calls

    run(body, tmp_path)


def test_memory_grows_to_the_containers_limits_plus_the_base(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        sandbox.config = dataclasses.replace(sandbox.config, static_sandbox_resource_mgmt=True,
                                             static_sandbox_base_memory=256)
        await sandbox.start(dataclasses.replace(
            SPEC, resources=PodResources(memory_limit_bytes=256 << 20)))
        assert sandbox.memory_mib == 512
        await sandbox.fit_memory(256)  # the limits it booted with: nothing to do
        assert "resize_memory" not in world.vm.calls
        await sandbox.fit_memory(768)
        assert sandbox.memory_mib == 1024 and ("online_memory", "1024") in world.agent.calls

    run(body, tmp_path)


def test_a_vm_restored_from_a_template_is_handed_over_first(tmp_path: Path) -> None:
    world = FakeWorld()
    sandbox = fake_sandbox(tmp_path, world)
    template = tmp_path / "template"
    sandbox.config = dataclasses.replace(
        sandbox.config, factory=FactoryConfig(enable_template=True, template_path=template))

    async def main() -> None:
        try:
            await sandbox.start(SPEC)
            assert world.vm.spec.template_dir == template
            calls = [c[0] for c in world.agent.calls]
            assert calls[:5] == ["set_guest_time", "reseed_random", "online_cpus",
                                 "online_memory", "guest_details"], calls
            sec, usec = int(world.agent.calls[0][1]), int(world.agent.calls[0][2])
            assert abs(sec + usec / 1e6 - time.time()) < 5 and 0 <= usec < 1_000_000
            assert len(bytes.fromhex(world.agent.calls[1][1])) >= 32
        finally:
            await sandbox.stop()

    asyncio.run(main())
    assert_nothing_left(tmp_path, world, sandbox)


def test_a_booted_vm_is_not_handed_over(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        assert world.vm.spec.template_dir is None  # templates are off by default
        assert "set_guest_time" not in [c[0] for c in world.agent.calls]

    run(body, tmp_path)


def test_a_failed_hand_over_fails_the_start_and_leaves_nothing(tmp_path: Path) -> None:
    world = FakeWorld()
    world.agent_fail_at = frozenset({"set_guest_time"})
    sandbox = fake_sandbox(tmp_path, world)
    sandbox.config = dataclasses.replace(sandbox.config, factory=FactoryConfig(
        enable_template=True, template_path=tmp_path / "template"))

    async def main() -> None:
        with pytest.raises(SandboxError, match="failed to set the guest's clock"):
            await sandbox.start(SPEC)
        assert sandbox.state is SandboxState.NEW

    asyncio.run(main())
    assert_nothing_left(tmp_path, world, sandbox)
