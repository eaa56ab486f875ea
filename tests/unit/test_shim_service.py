"""The Task service over a real Pod and Sandbox with a fake hypervisor and agent: events,
ordering, error codes, shutdown, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from hostos.procs import process_state
from protocols import cgroups_v2_pb2, task_pb2, task_types_pb2
from sandbox.pod import Pod
from sandbox.sandbox import SandboxState
from sandbox.storage import mounts_under
from shim.events import ZERO_TIME_SECONDS, TaskEvents
from shim.service import TaskService
from tests.unit.fakes import FakeAgent, FakeWorld, RecordingPublisher, fake_sandbox, write_bundle
from ttrpc import Code, TtrpcError


class Harness:
    """A TaskService over a Pod whose Sandbox runs fakes, called through its method table."""

    def __init__(self, tmp: Path, **hypervisor: Any) -> None:
        self.tmp = tmp
        self.publisher = RecordingPublisher()
        self.world = FakeWorld()
        self.sandbox = fake_sandbox(tmp, self.world, **hypervisor)
        self.pod = Pod(self.sandbox, TaskEvents(self.publisher))  # type: ignore[arg-type]
        self.shutdowns = 0
        self.service = TaskService(self.pod, "default", self._on_shutdown)
        self.methods = self.service.methods()

    def _on_shutdown(self) -> None:
        self.shutdowns += 1

    @property
    def agent(self) -> FakeAgent:
        return self.world.agent

    @property
    def vmm_pid(self) -> int:
        pid = self.world.vm.pid
        assert pid is not None
        return pid

    async def call(self, method: str, **fields: Any) -> Any:
        request_type, handler = self.methods[method]
        request = request_type(**fields)
        return await handler(request_type.FromString(request.SerializeToString()))

    async def create(self, cid: str, **fields: Any) -> Any:
        bundle = write_bundle(self.tmp / cid, hostname="h1")
        return await self.call("Create", id=cid, bundle=str(bundle), **fields)


def run(test: Callable[[Harness], Awaitable[None]], tmp: Path, **hypervisor: Any) -> None:
    """Run ``test``, then stop the pod's VM and check that nothing is left."""

    async def main() -> None:
        h = Harness(tmp, **hypervisor)
        try:
            await test(h)
        finally:
            await h.pod.stop_sandbox()
        assert h.sandbox.state is not SandboxState.RUNNING
        assert all(vm.pid is None or process_state(vm.pid, None) == "dead"
                   for vm in h.world.vms), "a fake VMM survived"  # fmt: skip
        assert mounts_under(tmp) == []
        sbs = tmp / "state" / "sbs"
        assert not sbs.exists() or list(sbs.iterdir()) == [], list(sbs.rglob("*"))

    asyncio.run(main())


async def expect(code: Code, call: Awaitable[Message]) -> TtrpcError:
    with pytest.raises(TtrpcError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


def test_lifecycle_events_in_order(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        created = await h.create("pod")
        assert created.pid == h.vmm_pid
        assert h.agent.calls[1:3] == [("create_sandbox", "h1"), ("create_container", "pod")]
        waiter = asyncio.ensure_future(h.call("Wait", id="pod"))
        assert (await h.call("Start", id="pod")).pid == h.vmm_pid
        h.agent.proc("pod").finish(0)
        waited = await asyncio.wait_for(waiter, 5)
        assert waited.exit_status == 0 and waited.exited_at.seconds > 0
        deleted = await h.call("Delete", id="pod")
        assert deleted.exit_status == 0
        assert h.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                        "/tasks/delete"]  # fmt: skip
        exit_event = h.publisher.events[2][1]
        assert (exit_event.container_id, exit_event.id, exit_event.pid) == ("pod", "pod",
                                                                            h.vmm_pid)
        assert h.world.vm.calls[-1] == "stop"  # the last container took the VM along
        assert h.sandbox.state is SandboxState.STOPPED

    run(body, tmp_path)


def test_instant_exit_never_overtakes_start(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        original = h.agent.start_container

        async def start_and_exit(cid: str) -> int:
            pid = await original(cid)
            h.agent.proc(cid).finish(1)
            await asyncio.sleep(0.01)  # give the exit every chance to race ahead
            return pid

        h.agent.start_container = start_and_exit  # type: ignore[method-assign]
        await h.call("Start", id="pod")
        await asyncio.wait_for(h.call("Wait", id="pod"), 5)
        assert h.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]

    run(body, tmp_path)


def test_state_of_a_created_task(tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    os.mkfifo(out / "out")

    async def with_fifo(h: Harness) -> None:
        await h.create("pod", stdout=str(out / "out"))
        state = await h.call("State", id="pod")
        assert state.status == task_types_pb2.CREATED and state.stdout == str(out / "out")
        assert (state.exited_at.seconds, state.exited_at.nanos) == (ZERO_TIME_SECONDS, 0)
        assert state.bundle == str(h.tmp / "pod") and state.id == "pod"
        await expect(Code.NOT_FOUND, h.call("State", id="nope"))
        await expect(Code.NOT_FOUND, h.call("State", id="pod", exec_id="nope"))

    run(with_fifo, tmp_path)


def test_kill_of_created_task_makes_wait_return_137(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        waiter = asyncio.ensure_future(h.call("Wait", id="pod"))
        await h.call("Kill", id="pod", signal=9, all=True)
        assert (await asyncio.wait_for(waiter, 1)).exit_status == 137
        state = await h.call("State", id="pod")
        assert state.status == task_types_pb2.STOPPED
        await expect(Code.NOT_FOUND, h.call("Kill", id="pod", signal=9))
        assert (await h.call("Delete", id="pod")).exit_status == 137

    run(body, tmp_path)


def test_duplicates_are_already_exists(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.ALREADY_EXISTS, h.create("pod"))
        await h.call("Start", id="pod")
        spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                           value=json.dumps({"args": ["ls"]}).encode())  # fmt: skip
        await h.call("Exec", id="pod", exec_id="e1", spec=spec)
        await expect(Code.ALREADY_EXISTS, h.call("Exec", id="pod", exec_id="e1", spec=spec))
        exec_config = h.pod.process("pod", "e1").exec_config
        assert exec_config is not None and exec_config.process == {"args": ["ls"]}

    run(body, tmp_path)


def test_exec_lifecycle_and_init_exit_published_last(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        assert (await h.call("Start", id="pod", exec_id="e1")).pid == h.vmm_pid
        await expect(Code.FAILED_PRECONDITION, h.call("Delete", id="pod", exec_id="e1"))
        h.agent.proc("pod").finish(0)  # init first: the exec dies a moment later
        await asyncio.sleep(0.05)
        h.agent.proc("pod", "e1").finish(137)
        await asyncio.wait_for(h.call("Wait", id="pod"), 5)
        assert (await h.call("Wait", id="pod", exec_id="e1")).exit_status == 137
        await h.call("Delete", id="pod", exec_id="e1")
        exits = [(e.id, e.exit_status) for t, e in h.publisher.events if t == "/tasks/exit"]
        assert exits == [("e1", 137), ("pod", 0)]
        topics = h.publisher.topics()
        assert topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                              "/tasks/exec-started"]  # fmt: skip
        await expect(Code.NOT_FOUND, h.call("State", id="pod", exec_id="e1"))

    run(body, tmp_path)


def test_exec_needs_a_running_container(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.FAILED_PRECONDITION, h.call("Exec", id="pod", exec_id="e1"))
        await expect(Code.NOT_FOUND, h.call("Exec", id="nope", exec_id="e1"))

    run(body, tmp_path)


def test_checkpoints_are_unimplemented(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.UNIMPLEMENTED, h.call("Checkpoint", id="pod"))

    run(body, tmp_path)


def test_pause_and_resume_freeze_the_container_and_say_so(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.FAILED_PRECONDITION, h.call("Pause", id="pod"))  # not started
        await h.call("Start", id="pod")
        await h.call("Pause", id="pod")
        assert (await h.call("State", id="pod")).status == task_types_pb2.PAUSED
        await expect(Code.FAILED_PRECONDITION, h.call("Pause", id="pod"))
        await expect(Code.FAILED_PRECONDITION, h.call("Exec", id="pod", exec_id="e1"))
        await h.call("Resume", id="pod")
        assert (await h.call("State", id="pod")).status == task_types_pb2.RUNNING
        await expect(Code.FAILED_PRECONDITION, h.call("Resume", id="pod"))
        await expect(Code.NOT_FOUND, h.call("Pause", id="nope"))
        assert h.publisher.topics()[-2:] == ["/tasks/paused", "/tasks/resumed"]
        assert h.publisher.events[-1][1].container_id == "pod"

    run(body, tmp_path)


def test_update_passes_oci_resources_to_the_guest(tmp_path: Path) -> None:
    resources = {"memory": {"limit": 64 << 20}, "cpu": {"quota": 50000, "period": 100000}}
    linux_resources = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"

    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.FAILED_PRECONDITION, h.call("Update", id="pod", resources=any_pb2.Any(
            type_url=linux_resources, value=json.dumps(resources).encode())))
        await h.call("Start", id="pod")
        await h.call("Update", id="pod", resources=any_pb2.Any(
            type_url=linux_resources, value=json.dumps(resources).encode()))
        assert h.agent.resources["pod"] == resources
        for bad in (any_pb2.Any(type_url="x/Other", value=b"{}"),
                    any_pb2.Any(type_url=linux_resources, value=b"[1]"),
                    any_pb2.Any(type_url=linux_resources, value=b"{")):
            await expect(Code.INVALID_ARGUMENT, h.call("Update", id="pod", resources=bad))

    run(body, tmp_path)


def test_stats_are_containerds_cgroup_v2_metrics(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.FAILED_PRECONDITION, h.call("Stats", id="pod"))
        await h.call("Start", id="pod")
        reply = await h.call("Stats", id="pod")
        assert reply.stats.type_url == "io.containerd.cgroups.v2.Metrics"
        m = cgroups_v2_pb2.Metrics.FromString(reply.stats.value)
        assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (1500, 1000, 0)
        assert (m.memory.usage, m.memory.anon, m.memory.usage_limit) == (8192, 4096, 2**64 - 1)
        assert m.pids.current == 2

    run(body, tmp_path)


def test_an_oom_kill_is_published_before_the_exit(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        h.agent.oom.add("pod")
        h.agent.proc("pod").finish(137)
        await asyncio.wait_for(h.call("Wait", id="pod"), 5)
        assert h.publisher.topics()[-2:] == ["/tasks/oom", "/tasks/exit"]
        assert h.publisher.events[-2][1].container_id == "pod"

    run(body, tmp_path)


def test_failed_boot_leaves_nothing_and_shutdown_exits(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        error = await expect(Code.INVALID_ARGUMENT, h.create("pod"))
        assert "/no/vmlinuz does not exist" in error.message and "make guest" in error.message
        assert h.world.vms == []  # refused before any VM was made
        await expect(Code.NOT_FOUND, h.call("Delete", id="pod"))
        await h.call("Shutdown", id="pod")
        assert h.shutdowns == 1 and h.publisher.topics() == []

    run(body, tmp_path, missing_file="/no/vmlinuz")


def test_a_vm_that_fails_to_start_is_unavailable_and_a_retry_works(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.world.vm_fail_at = frozenset({"start-after-spawn"})
        error = await expect(Code.UNAVAILABLE, h.create("pod"))
        assert "injected after spawn" in error.message
        assert h.sandbox.state is SandboxState.NEW
        h.world.vm_fail_at = frozenset()
        await h.create("pod")  # the same daemon may try again
        assert h.sandbox.state is SandboxState.RUNNING and len(h.world.vms) == 2

    run(body, tmp_path)


def test_shutdown_with_containers_left_is_a_no_op(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Shutdown", id="pod")
        assert h.shutdowns == 0 and h.sandbox.state is SandboxState.RUNNING

    run(body, tmp_path)


def test_connect_pids_and_pids(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        unknown = await h.call("Connect", id="pod")
        assert (unknown.shim_pid, unknown.task_pid) == (os.getpid(), 0)
        await h.create("pod")
        known = await h.call("Connect", id="pod")
        assert known.task_pid == h.vmm_pid and known.version
        assert [p.pid for p in (await h.call("Pids", id="pod")).processes] == [1, 7]

    run(body, tmp_path)


def test_vm_death_gives_every_running_process_an_exit(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        await h.call("Start", id="pod", exec_id="e1")
        await h.sandbox.stop()  # the VM is gone (its agent connection with it)
        assert (await asyncio.wait_for(h.call("Wait", id="pod"), 5)).exit_status == 255
        assert (await h.call("Wait", id="pod", exec_id="e1")).exit_status == 255

    run(body, tmp_path)


def test_second_container_joins_the_running_vm(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.create("c2")
        assert len(h.world.vms) == 1
        await h.call("Kill", id="c2", signal=9)
        await h.call("Delete", id="c2")
        assert h.sandbox.state is SandboxState.RUNNING  # the sandbox container is still there
        await h.call("Shutdown", id="c2")
        assert h.shutdowns == 0

    run(body, tmp_path)


def test_delete_request_bytes_match_task_proto() -> None:
    assert task_pb2.DeleteRequest(id="a", exec_id="b").SerializeToString() == b"\n\x01a\x12\x01b"


# -- corner cases where containerd's runc shim sets the behaviour ----------------------------


def test_kill_all_on_an_exec_signals_only_that_exec(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        await h.call("Start", id="pod", exec_id="e1")
        await h.call("Kill", id="pod", exec_id="e1", signal=15, all=True)
        assert h.agent.proc("pod", "e1").signals == [(15, False)]
        await h.call("Kill", id="pod", signal=0)  # a liveness probe: nothing happens
        assert h.agent.proc("pod").signals == [(0, False)]
        assert (await h.call("State", id="pod")).status == task_types_pb2.RUNNING

    run(body, tmp_path)


def test_only_the_init_publishes_task_delete(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        await h.call("Start", id="pod", exec_id="e1")
        h.agent.proc("pod", "e1").finish(0)
        await h.call("Wait", id="pod", exec_id="e1")
        await h.call("Delete", id="pod", exec_id="e1")
        assert "/tasks/delete" not in h.publisher.topics()
        await h.call("Kill", id="pod", signal=9)
        await h.call("Wait", id="pod")
        await h.call("Delete", id="pod")
        assert h.publisher.topics().count("/tasks/delete") == 1

    run(body, tmp_path)


def test_a_never_started_exec_deletes_with_status_0(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        deleted = await h.call("Delete", id="pod", exec_id="e1")
        assert deleted.exit_status == 0

    run(body, tmp_path)


def test_a_resize_before_start_is_applied_at_start(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod", terminal=True)
        await h.call("ResizePty", id="pod", width=120, height=40)
        assert not [c for c in h.agent.calls if c[0] == "tty_win_resize"]
        await h.call("Start", id="pod")
        assert ("tty_win_resize", "pod", "", "40", "120") in h.agent.calls

    run(body, tmp_path)


@pytest.mark.parametrize("bad", ["pod\n", "pod/x", "a..b", ""])
def test_ids_are_matched_whole(tmp_path: Path, bad: str) -> None:
    async def body(h: Harness) -> None:
        bundle = write_bundle(h.tmp / "b")
        await expect(Code.INVALID_ARGUMENT, h.call("Create", id=bad, bundle=str(bundle)))
        assert h.world.vms == []

    run(body, tmp_path)


def test_deleting_an_exec_makes_the_guest_forget_it(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        await h.call("Start", id="pod", exec_id="e1")
        h.agent.proc("pod", "e1").finish(0)
        await h.call("Wait", id="pod", exec_id="e1")
        await h.call("Delete", id="pod", exec_id="e1")
        assert ("remove_process", "pod", "e1") in h.agent.calls
        await h.call("Exec", id="pod", exec_id="e2")  # never started: the guest never knew it
        await h.call("Delete", id="pod", exec_id="e2")
        assert ("remove_process", "pod", "e2") not in h.agent.calls

    run(body, tmp_path)


def test_the_last_containers_delete_leaves_its_guest_copy_to_the_vm_stop(tmp_path: Path) -> None:
    """No RemoveContainer (a `crun delete` in the guest) when the VM stops right after:
    DestroySandbox kills what is left, and the stop unmounts the share (`run` checks)."""

    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        h.agent.proc("pod").finish(0)
        await asyncio.wait_for(h.call("Wait", id="pod"), 5)
        await h.call("Delete", id="pod")
        assert ("remove_container", "pod") not in h.agent.calls, h.agent.calls
        assert ("destroy_sandbox",) in h.agent.calls, h.agent.calls
        assert h.sandbox.state is SandboxState.STOPPED

    run(body, tmp_path)


def test_a_container_deleted_while_others_stay_is_removed_in_the_guest(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.create("c2")
        await h.call("Delete", id="c2")
        assert ("remove_container", "c2") in h.agent.calls, h.agent.calls
        assert h.sandbox.state is SandboxState.RUNNING

    run(body, tmp_path)


def test_a_create_during_the_last_delete_keeps_the_vm_and_removes_in_the_guest(
        tmp_path: Path) -> None:
    """Had a Create been reserved meanwhile, the VM stays: the guest copy is removed after."""

    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.create("c2")
        h.pod._ends_with = lambda container_id: True  # type: ignore[method-assign]
        await h.call("Delete", id="c2")
        assert ("remove_container", "c2") in h.agent.calls, h.agent.calls
        assert h.sandbox.state is SandboxState.RUNNING

    run(body, tmp_path)


def test_shutdown_waits_for_a_teardown_already_under_way(tmp_path: Path) -> None:
    """The agent broke the channel: the sandbox tears itself down, and containerd's Delete
    and Shutdown come in meanwhile (a loaded host makes the teardown slow). The daemon exits
    after Shutdown's reply, so the reply must wait for the teardown, or the state dir stays."""

    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        h.world.vm.stop_seconds = 0.3
        await h.agent.close()  # what the client does on garbage from the guest
        while h.sandbox.state is not SandboxState.STOPPING:
            await asyncio.sleep(0.01)
        assert (await asyncio.wait_for(h.call("Wait", id="pod"), 5)).exit_status == 255
        await h.call("Delete", id="pod")
        await h.call("Shutdown", id="pod")
        assert h.shutdowns == 1
        assert h.sandbox.state is SandboxState.STOPPED
        namespace_dir = h.sandbox.state_path.parent
        assert not namespace_dir.exists(), list(namespace_dir.rglob("*"))

    run(body, tmp_path)


def test_the_heap_is_trimmed_once_after_the_first_container_boots_the_vm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The boot's freed C heap goes back to the kernel once (malloc_trim), not per call."""
    trims: list[str] = []

    def trim() -> bool:
        trims.append("trim")
        return True

    monkeypatch.setattr("sandbox.pod.release_free_heap", trim)

    async def body(h: Harness) -> None:
        await h.create("pod")
        assert trims == ["trim"]
        await h.create("c2")
        assert trims == ["trim"]

    run(body, tmp_path)
