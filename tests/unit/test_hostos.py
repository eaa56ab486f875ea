"""hostos: process identity, kill_recorded, spawning through the parent-death wrapper, and
the cffi syscall module."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hostos.procs import (
    ProcessRecord,
    SurvivorError,
    is_alive,
    kill_recorded,
    process_state,
    record,
    set_cpu_bound,
    signal_child,
    spawn,
    start_time,
)

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
    monkeypatch.setattr("hostos.procs.os.kill", lambda pid, sig: None)
    rec = record(os.getpid(), "self")
    assert rec is not None
    with pytest.raises(SurvivorError, match="still alive"):
        kill_recorded([rec], timeout=0.05)


CHILD = """
import asyncio, sys
from pathlib import Path
from hostos.procs import spawn
async def main():
    proc = await spawn(["sleep", "60"], Path(sys.argv[1]), cpu_bound=sys.argv[2] == "1")
    print(proc.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@pytest.mark.parametrize("cpu_bound", [False, True])
def test_spawned_child_dies_with_parent_sigkill(tmp_path: Path, cpu_bound: bool) -> None:
    parent = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "err"),
                               str(int(cpu_bound))],
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


SCHED_PROBE = """
import os, sys, threading
policies = [os.sched_getscheduler(0)]
t = threading.Thread(target=lambda: policies.append(os.sched_getscheduler(0)))
t.start(); t.join()
sys.stderr.write(" ".join(map(str, policies)))
"""


@pytest.mark.parametrize("cpu_bound", [False, True])
def test_cpu_bound_helper_and_its_threads_run_as_batch(tmp_path: Path, cpu_bound: bool) -> None:
    async def run() -> int:
        proc = await spawn([sys.executable, "-c", SCHED_PROBE], tmp_path / "err",
                           cpu_bound=cpu_bound)
        return await proc.wait()

    assert asyncio.run(run()) == 0, (tmp_path / "err").read_text()
    policy = os.SCHED_BATCH if cpu_bound else os.SCHED_OTHER
    assert (tmp_path / "err").read_text() == f"{policy} {policy}"


# Helpers get stdout on /dev/null: the probe reports on stderr, which goes to a file.
FD_PROBE = """
import os, sys
fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
sys.stderr.write(" ".join(map(str, fds)) + "\\n")
sys.stderr.write(os.environ.get("KATA_SECRET_TOKEN", "-") + " " + os.environ["PATH"] + "\\n")
"""


def test_spawn_passes_only_the_fds_asked_for_and_a_clean_env(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KATA_SECRET_TOKEN", "leak")
    keep_r, keep_w = os.pipe()
    other_r, other_w = os.pipe()
    for fd in (keep_r, other_r):
        os.set_inheritable(fd, True)  # even inheritable fds stay out unless passed

    async def run() -> int:
        proc = await spawn([sys.executable, "-c", FD_PROBE], tmp_path / "err",
                           pass_fds=[keep_r])
        return await proc.wait()

    try:
        assert asyncio.run(run()) == 0, (tmp_path / "err").read_text()
    finally:
        for fd in (keep_r, keep_w, other_r, other_w):
            os.close(fd)
    fds_line, env_line = (tmp_path / "err").read_text().splitlines()
    fds = [int(f) for f in fds_line.split()]
    assert keep_r in fds and other_r not in fds
    assert env_line.startswith("- ") and "/usr/bin" in env_line


def test_process_state() -> None:
    me, started = os.getpid(), start_time(os.getpid())
    assert process_state(me, started) == "alive"
    assert process_state(me, None) == "alive"
    assert process_state(me, (started or 0) + 1) == "pid reused"
    assert process_state(2**22 + 1, 5) == "dead"
    assert process_state(0, None) == "none"


def test_generated_cffi_module_is_current(tmp_path: Path) -> None:
    from hostos import ffi_build

    for fresh in ffi_build.generate(tmp_path):
        committed = REPO / fresh.relative_to(tmp_path)
        assert fresh.read_text() == committed.read_text(), "run: python -m hostos.ffi_build"


def test_mount_errors_carry_errno_and_path(tmp_path: Path) -> None:
    from hostos import syscalls

    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError) as info:
        syscalls.mount("none", str(missing), "tmpfs", 0)
    assert info.value.filename == str(missing)
    with pytest.raises(OSError) as einval:
        syscalls.umount(str(tmp_path))  # not a mount point
    assert einval.value.errno == errno.EINVAL


def test_release_free_heap_hands_freed_c_heap_pages_back() -> None:
    """malloc_trim(0) in a child process: after a burst of heap allocations is freed, its
    resident anonymous memory drops (a child, so this test's own heap is not involved)."""
    code = """
import sys
from hostos import syscalls

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

# Many mid-sized bytes objects live on glibc's heap (over 512 bytes: not pymalloc's, below
# the mmap threshold); free all but every 64th so the heap's top stays pinned.
blocks = [bytes(4000) for _ in range(20000)]
keep = blocks[::64]
del blocks
before = anon_kib()
released = syscalls.release_free_heap()
after = anon_kib()
print(released, before, after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=60).stdout.split()
    released, before, after = out[0] == "True", int(out[1]), int(out[2])
    assert released
    assert before - after > 40 * 1024, (before, after)


def slow_child_watcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's child watcher reaps 0.3 s late: a child that died stays a zombie meanwhile
    (what a busy host does to it now and then)."""
    from asyncio import unix_events

    real = unix_events.ThreadedChildWatcher._do_waitpid

    def late(self: Any, *args: Any) -> None:
        time.sleep(0.3)
        real(self, *args)

    monkeypatch.setattr(unix_events.ThreadedChildWatcher, "_do_waitpid", late)


@pytest.mark.parametrize("ours", [True, False])
def test_signalling_a_child_that_just_died_leaves_its_status_to_asyncio(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ours: bool) -> None:
    """`signal_child` on a dead, unreaped child: asyncio still reports the real status.
    Python's own `Process.kill` reaps it first (Popen.send_signal polls): status 255."""
    slow_child_watcher(monkeypatch)

    async def run() -> int:
        proc = await spawn(["sh", "-c", "exit 3"], tmp_path / "err")
        started = start_time(proc.pid)
        while process_state(proc.pid, started) != "zombie":  # dead, not reaped yet
            await asyncio.sleep(0.01)
        if ours:
            signal_child(proc)
        else:
            proc.kill()
        return await proc.wait()

    assert asyncio.run(run()) == (3 if ours else 255)


def test_signal_child_kills_a_live_child_and_spares_a_waited_one(tmp_path: Path) -> None:
    async def run() -> tuple[int, int]:
        alive = await spawn(["sleep", "60"], tmp_path / "err")
        signal_child(alive)
        killed = await alive.wait()
        signal_child(alive)  # waited for: nothing is sent (its pid may be another's now)
        return killed, await alive.wait()

    assert asyncio.run(run()) == (-signal.SIGKILL, -signal.SIGKILL)


# A child with a thread of its own; once `go` exists it starts one more thread and reports
# the policy of each: main, the first thread, the one started after the change.
THREADS_PROBE = """
import os, sys, threading, time
go = sys.argv[1]
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
while not os.path.exists(go):
    time.sleep(0.01)
late = []
t = threading.Thread(target=lambda: late.append(os.sched_getscheduler(0)))
t.start(); t.join()
first = [int(x) for x in os.listdir("/proc/self/task")][1]
sys.stderr.write(f"{os.sched_getscheduler(0)} {os.sched_getscheduler(first)} {late[0]}")
"""


def test_set_cpu_bound_moves_every_thread_and_the_ones_started_after(tmp_path: Path) -> None:
    go = tmp_path / "go"

    async def run() -> int:
        proc = await spawn([sys.executable, "-c", THREADS_PROBE, str(go)], tmp_path / "err",
                           cpu_bound=True)
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 2:
            await asyncio.sleep(0.01)
        set_cpu_bound(proc.pid, False)
        go.touch()
        return await proc.wait()

    assert asyncio.run(run()) == 0, (tmp_path / "err").read_text()
    other = os.SCHED_OTHER
    assert (tmp_path / "err").read_text() == f"{other} {other} {other}"
    set_cpu_bound(2**22 + 1, True)  # no such process: nothing to do, no error
