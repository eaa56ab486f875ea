"""Host processes: spawning helpers, identifying them, killing what a crashed shim left.

Theory of operation
-------------------
* `spawn` starts a helper (a VMM, virtiofsd) as our child through a small exec wrapper,
  util-linux's ``setpriv --pdeathsig KILL --``: the wrapper sets ``PR_SET_PDEATHSIG`` and
  execs the helper, so the helper dies with the shim even under ``kill -9``, and no Python
  code runs between fork and exec (``preexec_fn`` is unsafe while threads exist). The
  helper gets stdin/stdout on /dev/null, stderr to a file or a pipe (the hypervisors layer
  copies it into a size-capped log), exactly the fds in ``pass_fds``
  (taps, vhost fds, memory) and a clean environment (``PATH`` only, plus what the caller
  adds). Linux sends the death signal when the *thread* that forked exits: asyncio forks
  from the event-loop thread, which lives as long as the shim. `spawn` returns only once
  the wrapper has exec'd the helper, so the signal is armed by then. The remaining window
  (the shim killed between fork and the wrapper's prctl, about a millisecond) is covered
  by the sandbox's state record and `kill_recorded`.
* A ``cpu_bound`` helper (a VMM emulating its guest's CPU) is exec'd through util-linux's
  ``chrt --batch 0`` after the wrapper (the death signal survives that exec): under
  ``SCHED_BATCH`` its threads, which inherit the policy, do not preempt running ones when
  they wake, so several such VMMs sharing few cores switch less. `set_cpu_bound` turns
  that off again (or on) for all its threads.
* A process is identified by ``(pid, start_time)``: field 22 of /proc/<pid>/stat, in clock
  ticks since boot. A pid may be reused; the pair may not. `ProcessRecord` is what the
  caller persists so that a later shim can `kill_recorded` what a crashed one left behind.
* Reaping is asyncio's job (its child watcher); nothing here calls ``waitpid(-1)``, and
  children are signalled with `signal_child`, never ``Process.send_signal``/``kill``:
  Python's ``Popen.send_signal`` polls first, which reaps a child that has just died
  before the watcher does, and the watcher then reports status 255, not the real one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # asyncio is imported where used: `shim delete` needs none of it
    import asyncio

    from hostos.adopted import AdoptedProcess

#: The exec wrapper and its arguments; the helper's argv follows.
PDEATHSIG_WRAPPER = ("setpriv", "--pdeathsig", "KILL", "--")
#: What a ``cpu_bound`` helper is exec'd through after the wrapper (util-linux too).
BATCH_WRAPPER = ("chrt", "--batch", "0")
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_WAIT = 5.0
WRAPPER_EXEC_WAIT = 2.0
POLL_INTERVAL = 0.02


class ProcessRecord(NamedTuple):
    """A helper process to clean up after a crash: persist it as a JSON list."""

    pid: int
    start_time: int
    role: str


class SurvivorError(TimeoutError):
    """Recorded processes were still alive after SIGKILL and the wait."""


def wrapper_path(name: str = PDEATHSIG_WRAPPER[0]) -> str:
    """The exec wrapper's absolute path (or that of util-linux's ``name``); OSError naming
    the package if it is missing."""
    for directory in CLEAN_PATH.split(":"):  # shutil.which, without importing shutil
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(2, f"{name} not found in {CLEAN_PATH}: install util-linux", name)


def wrapped_argv(argv: Sequence[str], cpu_bound: bool = False) -> list[str]:
    """``argv`` behind the parent-death-signal wrapper (and ``chrt`` if ``cpu_bound``)."""
    batch = [wrapper_path(BATCH_WRAPPER[0]), *BATCH_WRAPPER[1:]] if cpu_bound else []
    return [wrapper_path(), *PDEATHSIG_WRAPPER[1:], *batch, *argv]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a helper gets: PATH, plus ``extra``."""
    return {"PATH": CLEAN_PATH, **(extra or {})}


async def spawn(
    argv: Sequence[str], stderr: Path | int, *, pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None, cpu_bound: bool = False,
) -> asyncio.subprocess.Process:
    """Start ``argv`` as our child (see the module docstring); stderr to a file (truncated)
    or, with ``asyncio.subprocess.PIPE``, to ``proc.stderr`` for the caller to copy.
    ``cpu_bound``: run it under ``SCHED_BATCH`` (module docstring)."""
    wrapped = wrapped_argv(argv, cpu_bound)
    if not isinstance(stderr, Path):
        proc = await _exec(wrapped, stderr, pass_fds, env)
    else:
        with stderr.open("wb") as err:
            proc = await _exec(wrapped, err.fileno(), pass_fds, env)
    await _wrapper_done(proc.pid)
    return proc


def wrapper_exec_done(pid: int) -> bool:
    """Whether the wrapper has exec'd the helper (its death signal is armed from then on:
    the wrapper sets it just before that exec), or the process is gone."""
    try:
        return os.readlink(f"/proc/{pid}/exe") != os.path.realpath(wrapper_path())
    except OSError:
        return True  # exited (or a zombie): nothing left to arm


async def _wrapper_done(pid: int, timeout: float = WRAPPER_EXEC_WAIT) -> None:
    """Wait until `wrapper_exec_done`."""
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wrapper_exec_done(pid):
            return
        await asyncio.sleep(0.001)


async def _exec(wrapped: Sequence[str], stderr: int, pass_fds: Sequence[int],
                env: Mapping[str, str] | None) -> asyncio.subprocess.Process:  # fmt: skip
    import asyncio

    return await asyncio.create_subprocess_exec(
        *wrapped,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        pass_fds=tuple(pass_fds),
        close_fds=True,
        env=clean_env(env),
    )


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    return raw[raw.rindex(b")") + 2 :].decode().split()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None if no such process."""
    fields = _read_stat(pid)
    return int(fields[22 - 3]) if fields else None


def record(pid: int, role: str) -> ProcessRecord | None:
    """A `ProcessRecord` for a live ``pid``, None if it is already gone."""
    started = start_time(pid)
    return None if started is None else ProcessRecord(pid, started, role)


def is_alive(rec: ProcessRecord) -> bool:
    """True if the recorded process still exists, is not a zombie, and is the same process."""
    fields = _read_stat(rec.pid)
    if fields is None:
        return False
    return fields[0] != "Z" and int(fields[22 - 3]) == rec.start_time


def process_state(pid: int, started: int | None) -> str:
    """``alive``, ``dead``, ``zombie``, ``pid reused`` or ``none``; without a start time,
    the pid alone is checked."""
    if pid <= 0:
        return "none"
    now = start_time(pid)
    if now is None:
        return "dead"
    if started is None:
        return "alive"
    if now != started:
        return "pid reused"
    return "alive" if is_alive(ProcessRecord(pid, started, "")) else "zombie"


def kill_recorded(records: Iterable[ProcessRecord], timeout: float = KILL_WAIT) -> None:
    """SIGKILL each recorded process that is still the same process; wait for them to go.

    A record whose pid is gone, a zombie, or now another process (start time differs) is
    skipped. Blocking (it polls /proc for up to ``timeout``): from async code, run it with
    ``asyncio.to_thread``. Raises `SurvivorError` naming any survivor.
    """
    targets = [rec for rec in records if is_alive(rec)]
    for rec in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (left := [r for r in targets if is_alive(r)]) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL)
    if left:
        raise SurvivorError(f"failed to kill recorded processes: still alive: {left}")


def set_cpu_bound(pid: int, cpu_bound: bool) -> None:
    """Put every thread of our child ``pid`` under ``SCHED_BATCH`` (``cpu_bound``) or back
    under ``SCHED_OTHER``. The main thread (listed first) goes first: threads started from
    then on inherit its policy."""
    policy = os.SCHED_BATCH if cpu_bound else os.SCHED_OTHER
    try:
        threads = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return  # exited (and reaped)
    for tid in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setscheduler(tid, policy, os.sched_param(0))


def signal_child(proc: asyncio.subprocess.Process | AdoptedProcess,
                 sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to our child ``proc`` unless asyncio has seen it exit. ``os.kill``
    leaves a dead child's zombie, and its status, to asyncio's child watcher (module
    docstring). A zombie's pid is not reused; only between the watcher's reaping and its
    callback setting ``returncode`` could the pid be free, for a few microseconds. An
    adopted process (`hostos.adopted`) is signalled through its pidfd."""
    from hostos import adopted  # loaded with asyncio, which ``proc`` needs

    if isinstance(proc, adopted.AdoptedProcess):  # not ours to reap
        proc.send_signal(sig)
        return
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


async def wait_process(proc: asyncio.subprocess.Process | AdoptedProcess,
                       timeout: float) -> int | None:
    """Wait up to ``timeout`` for ``proc`` to exit; its return code, or None if still running."""
    import asyncio

    try:
        async with asyncio.timeout(timeout):
            return await proc.wait()
    except TimeoutError:
        return None


async def terminate(
    proc: asyncio.subprocess.Process, grace: float, sig: int = signal.SIGTERM
) -> int:
    """Send ``sig`` (if still running), then SIGKILL after ``grace``; return the exit code."""
    if proc.returncode is None:
        signal_child(proc, sig)
        code = await wait_process(proc, grace)
        if code is not None:
            return code
        signal_child(proc, signal.SIGKILL)
    code = await wait_process(proc, KILL_WAIT)
    if code is None:
        raise SurvivorError(f"failed to kill pid {proc.pid}: alive after SIGKILL")
    return code
