"""agent.container with a fake crun: state transitions, duplicates, failure clean-up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent import syscalls
from agent.container import Containers, RuntimeConfig
from agent.crun import Crun, CrunConfig, CrunError, last_error
from agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from agent.process import State
from agent.reaper import Reaper


class FakeCrun:
    """Stands in for crun: `create`/`exec` start a real `sleep` and write its pid file."""

    def __init__(self, reaper: Reaper, fail: str = "") -> None:
        self.reaper = reaper
        self.fail = fail
        self.calls: list[list[str]] = []

    async def run(self, log: str, args: Sequence[str], stdio: tuple[int, int, int]) -> None:
        self.calls.append(list(args))
        if self.fail and args[0] == self.fail:
            raise CrunError("crun create: executable file `/no/such` not found in $PATH")
        if args[0] in ("create", "exec"):
            pid, _ = self.reaper.spawn(["/bin/sleep", "30"], *stdio)
            Path(args[list(args).index("--pid-file") + 1]).write_text(str(pid))


def _spec(run_dir: Path) -> bytes:
    return json.dumps({"root": {"path": f"{run_dir}/shared/rootfs"},
                       "process": {"args": ["sleep", "30"]}}).encode()


def _run(tmp_path: Path, scenario: Any, fail: str = "") -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        config = RuntimeConfig(run_dir=str(tmp_path), cgroup_parent="",
                               crun=CrunConfig(cgroups=False))
        containers = Containers(config, reaper)
        fake = FakeCrun(reaper, fail)
        containers._crun = fake  # type: ignore[assignment]
        try:
            await scenario(containers, fake)
        finally:
            await containers.remove_all()
            reaper.uninstall()

    asyncio.run(main())


def test_lifecycle(tmp_path: Path) -> None:
    async def scenario(containers: Containers, fake: FakeCrun) -> None:
        c = await containers.create("c1", _spec(tmp_path), terminal=False, stdin=True)
        assert c.init.state is State.CREATED
        config = json.loads((tmp_path / "c1" / "config.json").read_text())
        assert "cgroupsPath" not in config["linux"]
        with pytest.raises(FailedPrecondition):
            await containers.exec("c1", "e1", b'{"args": ["true"]}', stdin=False)
        pid = await containers.start("c1")
        assert pid == c.init.pid and c.init.state is State.RUNNING
        with pytest.raises(FailedPrecondition):
            await containers.start("c1")
        assert await containers.exec("c1", "e1", b'{"args": ["true"]}', stdin=False) > 0
        with pytest.raises(AlreadyExists):
            await containers.exec("c1", "e1", b'{"args": ["true"]}', stdin=False)
        assert sorted(containers.pids("c1")) == sorted([pid, c.execs["e1"].pid])
        containers.signal("c1", "", signal.SIGKILL, all_processes=False)
        assert await c.init.wait() == 137 and c.init.state is State.EXITED
        with pytest.raises(NotFound):
            containers.signal("c1", "", signal.SIGTERM, all_processes=False)
        await containers.remove("c1")
        assert not (tmp_path / "c1").exists()
        assert fake.calls[-1][:2] == ["delete", "--force"]
        with pytest.raises(NotFound):
            containers.get("c1")

    _run(tmp_path, scenario)


def test_an_exited_exec_is_forgotten_on_request(tmp_path: Path) -> None:
    async def scenario(containers: Containers, fake: FakeCrun) -> None:
        c = await containers.create("c1", _spec(tmp_path), terminal=False, stdin=False)
        await containers.start("c1")
        await containers.exec("c1", "e1", b'{"args": ["sleep", "30"]}', stdin=False)
        with pytest.raises(FailedPrecondition, match="still running"):
            await containers.remove_exec("c1", "e1")
        containers.signal("c1", "e1", signal.SIGKILL, all_processes=False)
        assert await c.execs["e1"].wait() == 137
        await containers.remove_exec("c1", "e1")
        assert "e1" not in c.execs  # an exec probe every 10 s no longer piles up
        with pytest.raises(NotFound):
            await containers.remove_exec("c1", "e1")

    _run(tmp_path, scenario)


def test_duplicates_and_bad_input(tmp_path: Path) -> None:
    async def scenario(containers: Containers, fake: FakeCrun) -> None:
        await containers.create("c1", _spec(tmp_path), terminal=False, stdin=False)
        with pytest.raises(AlreadyExists):
            await containers.create("c1", _spec(tmp_path), terminal=False, stdin=False)
        with pytest.raises(InvalidArgument):
            await containers.create("../c2", _spec(tmp_path), terminal=False, stdin=False)
        bad_root = json.dumps({"root": {"path": "/etc"}, "process": {"args": ["x"]}}).encode()
        with pytest.raises(InvalidArgument):
            await containers.create("c3", bad_root, terminal=False, stdin=False)
        with pytest.raises(NotFound):
            containers.process("c1", "nope")
        with pytest.raises(InvalidArgument):
            containers.signal("c1", "", 65, all_processes=False)
        containers.signal("c1", "", 0, all_processes=False)  # a liveness probe: fine
        assert not (tmp_path / "c3").exists()

    _run(tmp_path, scenario)


def test_failed_create_leaves_nothing(tmp_path: Path) -> None:
    async def scenario(containers: Containers, fake: FakeCrun) -> None:
        with pytest.raises(CrunError, match="/no/such"):
            await containers.create("c1", _spec(tmp_path), terminal=False, stdin=True)
        assert containers.ids() == []
        assert not (tmp_path / "c1").exists()
        fake.fail = ""
        await containers.create("c1", _spec(tmp_path), terminal=False, stdin=True)  # id reusable

    _run(tmp_path, scenario, fail="create")


def test_fds_are_not_leaked(tmp_path: Path) -> None:
    async def scenario(containers: Containers, fake: FakeCrun) -> None:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            await containers.create("c1", _spec(tmp_path), terminal=False, stdin=True)
            await containers.remove("c1")
        assert len(os.listdir("/proc/self/fd")) <= before + 1  # + the shared /dev/null

    _run(tmp_path, scenario)


def test_crun_log_parsing() -> None:
    log = ('{"msg":"warning","level":"warning"}\n'
           '{"msg":"executable file `/no/such` not found","level":"error"}\n')
    assert last_error(log) == "executable file `/no/such` not found"
    assert last_error("plain text\n") == "plain text"


@pytest.mark.parametrize("fixed", [False, True])
def test_crun_starts_at_a_fixed_layout_only_when_asked(tmp_path: Path, fixed: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``fixed_layout`` crun starts without address-space randomisation (a TCG guest
    then reuses its translated code); the agent's own personality is left as it was."""
    out = tmp_path / "personality"
    stand_in = tmp_path / "crun"
    stand_in.write_text('#!/bin/sh\nread p < /proc/self/personality\necho "$p" > "$OUT"\n')
    stand_in.chmod(0o755)
    monkeypatch.setenv("OUT", str(out))
    before = syscalls.personality(syscalls.QUERY_PERSONALITY)

    async def main() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            crun = Crun(CrunConfig(binary=str(stand_in), fixed_layout=fixed), reaper)
            await crun.run(str(tmp_path / "crun.log"), ["state", "c1"], (devnull,) * 3)
        finally:
            os.close(devnull)
            reaper.uninstall()

    asyncio.run(main())
    assert bool(int(out.read_text(), 16) & syscalls.ADDR_NO_RANDOMIZE) is fixed
    assert syscalls.personality(syscalls.QUERY_PERSONALITY) == before


def test_remove_all_keeping_state_kills_and_forgets_without_crun(tmp_path: Path) -> None:
    """DestroySandbox in a VM (the VM stops next): every process is killed and waited for,
    and crun is not run: its state and the bundles go with the guest's memory."""

    async def scenario(containers: Containers, fake: FakeCrun) -> None:
        c = await containers.create("c1", _spec(tmp_path), terminal=False, stdin=True)
        await containers.start("c1")
        await containers.exec("c1", "e1", b'{"args": ["sleep", "30"]}', stdin=False)
        pids = [c.init.pid, c.execs["e1"].pid]
        runs = len(fake.calls)
        await containers.remove_all(keep_state=True)
        assert c.init.exited and c.execs["e1"].exited
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or \
                "zombie" not in Path(f"/proc/{pid}/status").read_text(), pid
        assert containers.ids() == []
        assert fake.calls[runs:] == [], fake.calls[runs:]  # no `crun delete`
        assert (tmp_path / "c1").is_dir()  # the bundle stays (guest memory, in a VM)

    _run(tmp_path, scenario)
