"""Process helpers: start times, kill_recorded, and the parent-death signal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypervisors.errors import HypervisorTimeout
from hypervisors.procs import ProcessRecord, is_alive, kill_recorded, record, spawn, start_time

REPO = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_start_time_of_self_and_of_missing() -> None:
    started = start_time(os.getpid())
    assert isinstance(started, int) and started > 0
    assert start_time(2**22 + 1) is None  # above pid_max
    assert record(os.getpid(), "me") == ProcessRecord(os.getpid(), started, "me")


def test_kill_recorded_kills_matching_and_spares_reused_pid() -> None:
    victim = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        rec = record(victim.pid, "qemu")
        assert rec is not None and is_alive(rec)
        other = record(bystander.pid, "virtiofsd")
        assert other is not None
        reused = other._replace(start_time=other.start_time - 1)  # same pid, another process
        kill_recorded([rec, reused, ProcessRecord(2**22 + 1, 1, "ghost")], timeout=5)
        assert victim.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()


def test_kill_recorded_reports_survivor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hypervisors.procs.os.kill", lambda pid, sig: None)
    rec = record(os.getpid(), "self")
    assert rec is not None
    with pytest.raises(HypervisorTimeout, match="still alive"):
        kill_recorded([rec], timeout=0.05)


CHILD = """
import asyncio, sys
from pathlib import Path
from hypervisors.procs import spawn
async def main():
    proc = await spawn(["sleep", "60"], Path(sys.argv[1]))
    print(proc.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_spawned_child_dies_with_parent_sigkill(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "err")],
                              stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert not gone(pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gone(pid)
    finally:
        parent.kill()
        parent.wait()


def test_spawn_stderr_to_file(tmp_path: Path) -> None:
    async def run() -> int:
        proc = await spawn(["sh", "-c", "echo oops >&2; exit 3"], tmp_path / "err")
        return await proc.wait()

    assert asyncio.run(run()) == 3
    assert (tmp_path / "err").read_text() == "oops\n"
