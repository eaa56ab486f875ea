"""The process lifecycle table (every cell) and a process's pumps and exit (fake agent)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sandbox.errors import FailedPreconditionError, NotFoundError, SandboxError
from sandbox.guest import Guest
from sandbox.lifecycle import Refusal, missing_cells, transition
from sandbox.process import (
    TRANSITIONS,
    InvalidTransition,
    Op,
    Process,
    ProcessGone,
    State,
)
from sandbox.types import ExecConfig, StdioPaths
from shim.stdio import open_stdio
from tests.unit.fakes import FakeAgent
from ttrpc import Code

ALLOWED = {
    (State.CREATED, Op.START): State.RUNNING,
    (State.CREATED, Op.KILL): State.STOPPED,
    (State.CREATED, Op.DELETE): State.DELETED,
    (State.CREATED, Op.RESIZE_PTY): State.CREATED,
    (State.CREATED, Op.CLOSE_STDIN): State.CREATED,
    (State.RUNNING, Op.KILL): State.RUNNING,
    (State.RUNNING, Op.EXIT): State.STOPPED,
    (State.RUNNING, Op.RESIZE_PTY): State.RUNNING,
    (State.RUNNING, Op.CLOSE_STDIN): State.RUNNING,
    (State.RUNNING, Op.PAUSE): State.PAUSED,
    (State.PAUSED, Op.KILL): State.PAUSED,
    (State.PAUSED, Op.EXIT): State.STOPPED,
    (State.PAUSED, Op.RESIZE_PTY): State.PAUSED,
    (State.PAUSED, Op.CLOSE_STDIN): State.PAUSED,
    (State.PAUSED, Op.RESUME): State.RUNNING,
    (State.STOPPED, Op.DELETE): State.DELETED,
    (State.STOPPED, Op.CLOSE_STDIN): State.STOPPED,
}
NOT_FOUND = {(State.STOPPED, Op.KILL)} | {(State.DELETED, op) for op in Op}


def test_every_cell_is_listed_explicitly() -> None:
    assert missing_cells(TRANSITIONS, State, Op) == []
    assert len(TRANSITIONS) == len(State) * len(Op)


@pytest.mark.parametrize(("state", "op"), [(s, o) for s in State for o in Op])
def test_cell(state: State, op: Op) -> None:
    if (state, op) in ALLOWED:
        assert transition(TRANSITIONS, state, op, "process p") is ALLOWED[(state, op)]
        return
    cell = TRANSITIONS[(state, op)]
    assert isinstance(cell, Refusal)
    expected = ProcessGone if (state, op) in NOT_FOUND else InvalidTransition
    with pytest.raises(expected) as info:
        transition(TRANSITIONS, state, op, "process p")
    assert str(info.value).startswith(f"failed to {op.value} process p: ")
    code = Code.NOT_FOUND if expected is ProcessGone else Code.FAILED_PRECONDITION
    assert info.value.code == code


def new_process(agent: FakeAgent, exits: list[Process], exec_id: str = "",
                paths: StdioPaths | None = None) -> Process:  # fmt: skip
    return Process(Guest(lambda: agent), "c1", exec_id, paths or StdioPaths(), asyncio.Lock(),
                   exits.append)  # fmt: skip


async def started(exec_id: str = "", paths: StdioPaths | None = None,
                  stdio: bool = False) -> tuple[FakeAgent, Process, list[Process]]:  # fmt: skip
    sandbox, exits = FakeAgent(), []
    process = new_process(sandbox, exits, exec_id, paths)
    if stdio and paths is not None:
        process.io = await open_stdio(paths.stdin, paths.stdout, paths.stderr, paths.terminal,
                                      "c1", "default")  # fmt: skip
    assert await process.start() == 101
    return sandbox, process, exits


def test_exit_is_recorded_once_output_is_drained(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    os.mkfifo(out)

    async def run() -> None:
        reader = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        sandbox, process, exits = await started(paths=StdioPaths(stdout=out), stdio=True)
        sandbox.proc("c1").finish(3, out=b"last words")
        await asyncio.wait_for(process.wait(), 5)
        assert (process.state, process.exit_status, exits) == (State.STOPPED, 3, [process])
        assert process.exited_at_ns is not None
        assert os.read(reader, 100) == b"last words"
        assert os.read(reader, 100) == b""  # outputs closed at exit: the client sees EOF
        os.close(reader)

    asyncio.run(run())


@pytest.mark.parametrize("exec_id", ["", "e1"])
def test_a_failed_start_closes_the_clients_fifos_and_leaves_the_process_deletable(
        tmp_path: Path, exec_id: str) -> None:
    """containerd's client waits for EOF on its fifos before it reports a failed Start, so
    a start that fails (a program missing in the container) must close our ends."""
    out, err = str(tmp_path / "out"), str(tmp_path / "err")
    os.mkfifo(out)
    os.mkfifo(err)
    method = "exec_process" if exec_id else "start_container"

    async def run() -> None:
        readers = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in (out, err)]
        agent, exits = FakeAgent(fail_at=frozenset({method})), []
        config = ExecConfig("c1", exec_id, {"args": ["/no/such"]}, False, False)
        process = Process(Guest(lambda: agent), "c1", exec_id, StdioPaths(stdout=out, stderr=err),
                          asyncio.Lock(), exits.append, exec_config=config if exec_id else None)
        process.io = await open_stdio("", out, err, False, "c1", "default")
        with pytest.raises(SandboxError, match="injected"):
            await process.start()
        assert [os.read(r, 10) for r in readers] == [b"", b""]  # EOF: no writer left
        assert process.state is State.CREATED
        await process.delete()
        assert process.state is State.DELETED
        assert exits == []
        for r in readers:
            os.close(r)

    asyncio.run(run())


def test_wait_works_before_start_and_kill_of_created_gives_137() -> None:
    async def run() -> None:
        exits: list[Process] = []
        process = new_process(FakeAgent(), exits)
        waiter = asyncio.ensure_future(process.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        await process.kill(9)
        await asyncio.wait_for(waiter, 1)
        assert (process.state, process.exit_status, exits) == (State.STOPPED, 137, [process])

    asyncio.run(run())


def test_signal_zero_on_created_changes_nothing() -> None:
    async def run() -> None:
        process = new_process(FakeAgent(), [])
        await process.kill(0)
        assert process.state is State.CREATED

    asyncio.run(run())


def test_lost_vm_becomes_exit_255() -> None:
    async def run() -> None:
        agent, process, exits = await started()
        await agent.close()  # the VM and its agent are gone
        await asyncio.wait_for(process.wait(), 5)
        assert (process.exit_status, exits) == (255, [process])

    asyncio.run(run())


def test_running_process_refuses_delete_then_deletes_after_exit() -> None:
    async def run() -> None:
        _, process, _ = await started()
        with pytest.raises(FailedPreconditionError, match="still running"):
            await process.delete()
        await process.kill(15)
        await asyncio.wait_for(process.wait(), 5)
        assert process.exit_status == 143
        with pytest.raises(NotFoundError):
            await process.kill(9)
        await process.delete()
        assert process.state is State.DELETED

    asyncio.run(run())


def test_stdin_is_forwarded_then_closed_on_eof(tmp_path: Path) -> None:
    path = str(tmp_path / "in")
    os.mkfifo(path)

    async def run() -> None:
        sandbox, _, _ = await started(paths=StdioPaths(stdin=path), stdio=True)
        writer = await asyncio.to_thread(os.open, path, os.O_WRONLY)
        os.write(writer, b"input")
        os.close(writer)
        proc = sandbox.proc("c1")
        await asyncio.wait_for(proc.stdin_closed.wait(), 5)
        assert bytes(proc.stdin) == b"input"

    asyncio.run(run())


def test_close_io_closes_stdin_after_buffered_data(tmp_path: Path) -> None:
    path = str(tmp_path / "in")
    os.mkfifo(path)

    async def run() -> None:
        sandbox, process, _ = await started(paths=StdioPaths(stdin=path), stdio=True)
        writer = await asyncio.to_thread(os.open, path, os.O_WRONLY)  # the client stays
        os.write(writer, b"buffered")
        await asyncio.sleep(0.05)
        process.close_stdin()
        proc = sandbox.proc("c1")
        await asyncio.wait_for(proc.stdin_closed.wait(), 5)
        assert bytes(proc.stdin) == b"buffered"
        os.close(writer)

    asyncio.run(run())


def test_resize_only_with_a_terminal() -> None:
    async def run() -> None:
        sandbox, process, _ = await started(paths=StdioPaths(terminal=True))
        await process.resize(80, 24)
        assert sandbox.calls[-1] == ("tty_win_resize", "c1", "", "24", "80")  # rows, cols
        plain_sandbox, plain, _ = await started()
        await plain.resize(80, 24)
        assert not [c for c in plain_sandbox.calls if c[0] == "tty_win_resize"]

    asyncio.run(run())


def test_an_exec_starts_with_its_own_process_spec() -> None:
    async def run() -> None:
        from sandbox.types import ExecConfig

        agent = FakeAgent()
        e = ExecConfig("c1", "e1", {"args": ["ls"]}, terminal=False, stdin=False)
        process = Process(Guest(lambda: agent), "c1", "e1", StdioPaths(), asyncio.Lock(),
                          lambda p: None, exec_config=e)  # fmt: skip
        assert await process.start() == 101
        assert ("exec_process", "c1", "e1", '{"args": ["ls"]}') in agent.calls
        agent.proc("c1", "e1").finish(0)
        await asyncio.wait_for(process.wait(), 5)

    asyncio.run(run())


def test_a_paused_process_takes_signals_and_its_exit_and_resumes() -> None:
    async def run() -> None:
        agent, process, exits = await started()
        await process.pause()
        assert process.state is State.PAUSED
        with pytest.raises(InvalidTransition, match="already paused"):
            await process.pause()
        with pytest.raises(InvalidTransition, match="paused: kill it first"):
            await process.delete()
        await process.resume()
        assert process.state is State.RUNNING
        await process.pause()
        await process.kill(9)  # a frozen cgroup still takes SIGKILL
        await asyncio.wait_for(process.wait(), 5)
        assert (process.state, process.exit_status, exits) == (State.STOPPED, 137, [process])
        assert [c for c in agent.calls if c[0] in ("pause_container", "resume_container")] == [
            ("pause_container", "c1"), ("resume_container", "c1"), ("pause_container", "c1")]

    asyncio.run(run())


def test_an_oom_killed_init_says_so() -> None:
    async def run() -> None:
        agent, process, _ = await started()
        agent.oom.add("c1")
        agent.proc("c1").finish(137)
        await asyncio.wait_for(process.wait(), 5)
        assert process.oom_killed

    asyncio.run(run())
