"""Child processes of the hypervisors layer: spawning, identity, and killing after a crash.

Theory of operation:

* `spawn` starts a helper (QEMU, virtiofsd) with asyncio's subprocess machinery, stdin and
  stdout on /dev/null and stderr to a (truncated) file, and sets ``PR_SET_PDEATHSIG=SIGKILL``
  in the child so it dies with the shim even under ``kill -9``. Caveat: Linux sends the death
  signal when the *thread* that forked exits, not the process. asyncio forks from the event
  loop thread, so the loop must run in a thread that lives as long as the shim (the main
  thread, as ``asyncio.run`` does). libc's ``prctl`` is resolved before the fork so the child
  only makes one foreign call.
* A process is identified by ``(pid, start_time)``: field 22 of /proc/<pid>/stat, in clock
  ticks since boot. A pid may be reused; the pair may not. `ProcessRecord` is what the caller
  persists so that a later shim can `kill_recorded` what a crashed one left behind.
* Reaping is asyncio's job (its child watcher); nothing here calls ``waitpid(-1)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from hypervisors.errors import HypervisorTimeout
from hypervisors.timeouts import TIMEOUTS

if TYPE_CHECKING:  # asyncio is imported where used: `shim delete` needs none of it
    import asyncio

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl


class ProcessRecord(NamedTuple):
    """A helper process to clean up after a crash: persist it as a JSON list."""

    pid: int
    start_time: int
    role: str


def _set_pdeathsig(parent_pid: int) -> None:
    """Run in the child between fork and exec: die with SIGKILL when the parent thread goes."""
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(126)


async def spawn(argv: Sequence[str], stderr_path: Path) -> asyncio.subprocess.Process:
    """Start ``argv`` as our child with stderr written to ``stderr_path`` (truncated)."""
    import asyncio

    parent = os.getpid()
    with stderr_path.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
            preexec_fn=lambda: _set_pdeathsig(parent),
            close_fds=True,
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


def kill_recorded(records: Iterable[ProcessRecord], timeout: float = TIMEOUTS.kill_wait) -> None:
    """SIGKILL each recorded process that is still the same process; wait for them to go.

    A record whose pid is gone, a zombie, or now another process (start time differs) is
    skipped. Blocking (it polls /proc for up to ``timeout``): from async code, run it with
    ``asyncio.to_thread``. Raises `HypervisorTimeout` naming any survivor.
    """
    targets = [rec for rec in records if is_alive(rec)]
    for rec in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (left := [r for r in targets if is_alive(r)]) and time.monotonic() < deadline:
        time.sleep(TIMEOUTS.poll_interval)
    if left:
        raise HypervisorTimeout(f"failed to kill recorded processes: still alive: {left}")


async def wait_process(proc: asyncio.subprocess.Process, timeout: float) -> int | None:
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
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        code = await wait_process(proc, grace)
        if code is not None:
            return code
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    code = await wait_process(proc, TIMEOUTS.kill_wait)
    if code is None:
        raise HypervisorTimeout(f"failed to kill pid {proc.pid}: alive after SIGKILL")
    return code


