"""The Task service against a fake sandbox: events, ordering, error codes, shutdown."""

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

from protocols import task_pb2, task_types_pb2
from sandbox.config import load_config
from shim.events import ZERO_TIME_SECONDS, TaskEvents
from shim.pod import Pod
from shim.service import TaskService
from tests.unit.test_shim_fakes import FakeSandbox, RecordingPublisher, write_bundle, write_config
from ttrpc import Code, TtrpcError


class Harness:
    """A TaskService wired to a FakeSandbox, called through its ttrpc method table."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.publisher = RecordingPublisher()
        self.sandboxes: list[FakeSandbox] = []
        config = load_config(str(write_config(tmp / "c.toml", tmp / "state")))
        self.pod = Pod("pod", config, "default", TaskEvents(self.publisher),  # type: ignore[arg-type]
                       self._factory)  # fmt: skip
        self.shutdowns = 0
        self.service = TaskService(self.pod, self._on_shutdown)
        self.methods = self.service.methods()

    def _factory(self, sandbox_id: str, config: Any) -> FakeSandbox:
        sandbox = FakeSandbox(sandbox_id, config)
        self.sandboxes.append(sandbox)
        return sandbox

    def _on_shutdown(self) -> None:
        self.shutdowns += 1

    @property
    def sandbox(self) -> FakeSandbox:
        return self.sandboxes[-1]

    async def call(self, method: str, **fields: Any) -> Any:
        request_type, handler = self.methods[method]
        request = request_type(**fields)
        return await handler(request_type.FromString(request.SerializeToString()))

    async def create(self, cid: str, **fields: Any) -> Any:
        bundle = write_bundle(self.tmp / cid, hostname="h1")
        return await self.call("Create", id=cid, bundle=str(bundle), **fields)


def run(test: Callable[[Harness], Awaitable[None]], tmp: Path) -> None:
    async def main() -> None:
        await test(Harness(tmp))

    asyncio.run(main())


async def expect(code: Code, call: Awaitable[Message]) -> TtrpcError:
    with pytest.raises(TtrpcError) as info:
        await call
    assert info.value.code == code, info.value
    return info.value


def test_lifecycle_events_in_order(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        created = await h.create("pod")
        assert created.pid == FakeSandbox.qemu_pid
        assert h.sandbox.calls[:2] == [("start", "h1"), ("create_container", "pod")]
        waiter = asyncio.ensure_future(h.call("Wait", id="pod"))
        assert (await h.call("Start", id="pod")).pid == FakeSandbox.qemu_pid
        h.sandbox.proc("pod").finish(0)
        waited = await asyncio.wait_for(waiter, 5)
        assert waited.exit_status == 0 and waited.exited_at.seconds > 0
        deleted = await h.call("Delete", id="pod")
        assert deleted.exit_status == 0
        assert h.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                        "/tasks/delete"]  # fmt: skip
        exit_event = h.publisher.events[2][1]
        assert (exit_event.container_id, exit_event.id, exit_event.pid) == ("pod", "pod", 4242)
        assert ("stop",) in h.sandbox.calls  # the last container took the VM along

    run(body, tmp_path)


def test_instant_exit_never_overtakes_start(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        original = h.sandbox.start_process

        async def start_and_exit(cid: str, eid: str) -> int:
            pid = await original(cid, eid)
            h.sandbox.proc(cid, eid).finish(1)
            await asyncio.sleep(0.01)  # give the exit every chance to race ahead
            return pid

        h.sandbox.start_process = start_and_exit  # type: ignore[method-assign]
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
        assert h.sandbox.execs[("pod", "e1")].process == {"args": ["ls"]}

    run(body, tmp_path)


def test_exec_lifecycle_and_init_exit_published_last(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        assert (await h.call("Start", id="pod", exec_id="e1")).pid == 4242
        await expect(Code.FAILED_PRECONDITION, h.call("Delete", id="pod", exec_id="e1"))
        h.sandbox.proc("pod").finish(0)  # init first: the exec dies a moment later
        await asyncio.sleep(0.05)
        h.sandbox.proc("pod", "e1").finish(137)
        await asyncio.wait_for(h.call("Wait", id="pod"), 5)
        assert (await h.call("Wait", id="pod", exec_id="e1")).exit_status == 137
        await h.call("Delete", id="pod", exec_id="e1")
        exits = [(e.id, e.exit_status) for t, e in h.publisher.events if t == "/tasks/exit"]
        assert exits == [("e1", 137), ("pod", 0)]
        topics = h.publisher.topics()
        assert topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/exec-added",
                              "/tasks/exec-started"]  # fmt: skip
        assert ("remove_process", "pod", "e1") in h.sandbox.calls

    run(body, tmp_path)


def test_exec_needs_a_running_container(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.FAILED_PRECONDITION, h.call("Exec", id="pod", exec_id="e1"))
        await expect(Code.NOT_FOUND, h.call("Exec", id="nope", exec_id="e1"))

    run(body, tmp_path)


@pytest.mark.parametrize(("method", "fields"), [
    ("Pause", {"id": "pod"}), ("Resume", {"id": "pod"}), ("Checkpoint", {"id": "pod"}),
    ("Update", {"id": "pod"}), ("Stats", {"id": "pod"}),
])  # fmt: skip
def test_unsupported_rpcs_are_unimplemented(tmp_path: Path, method: str,
                                            fields: dict[str, str]) -> None:  # fmt: skip
    async def body(h: Harness) -> None:
        await h.create("pod")
        await expect(Code.UNIMPLEMENTED, h.call(method, **fields))

    run(body, tmp_path)


def test_failed_boot_leaves_nothing_and_shutdown_exits(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        from sandbox.errors import InvalidArgumentError

        original = h._factory

        def failing(sandbox_id: str, config: Any) -> FakeSandbox:
            sandbox = original(sandbox_id, config)
            sandbox.fail_start = InvalidArgumentError("failed to start sandbox pod: no kernel")
            return sandbox

        h.pod._factory = failing  # type: ignore[assignment]
        error = await expect(Code.INVALID_ARGUMENT, h.create("pod"))
        assert "no kernel" in error.message
        await expect(Code.NOT_FOUND, h.call("Delete", id="pod"))
        await h.call("Shutdown", id="pod")
        assert h.shutdowns == 1 and h.publisher.topics() == []

    run(body, tmp_path)


def test_shutdown_with_containers_left_is_a_no_op(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Shutdown", id="pod")
        assert h.shutdowns == 0 and h.sandbox.running

    run(body, tmp_path)


def test_connect_pids_and_pids(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        unknown = await h.call("Connect", id="pod")
        assert (unknown.shim_pid, unknown.task_pid) == (os.getpid(), 0)
        await h.create("pod")
        known = await h.call("Connect", id="pod")
        assert known.task_pid == 4242 and known.version
        assert [p.pid for p in (await h.call("Pids", id="pod")).processes] == [1, 7]

    run(body, tmp_path)


def test_vm_death_gives_every_running_process_an_exit(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.call("Start", id="pod")
        await h.call("Exec", id="pod", exec_id="e1")
        await h.call("Start", id="pod", exec_id="e1")
        await h.sandbox.stop()  # the VM is gone
        assert (await asyncio.wait_for(h.call("Wait", id="pod"), 5)).exit_status == 255
        assert (await h.call("Wait", id="pod", exec_id="e1")).exit_status == 255

    run(body, tmp_path)


def test_second_container_joins_the_running_vm(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.create("pod")
        await h.create("c2")
        assert len(h.sandboxes) == 1
        await h.call("Kill", id="c2", signal=9)
        await h.call("Delete", id="c2")
        assert h.sandbox.running  # the pod's sandbox container is still there
        await h.call("Shutdown", id="c2")
        assert h.shutdowns == 0

    run(body, tmp_path)


def test_delete_request_bytes_match_task_proto() -> None:
    assert task_pb2.DeleteRequest(id="a", exec_id="b").SerializeToString() == b"\n\x01a\x12\x01b"
