"""`hostos.adopted.AdoptedProcess`: a process we run but do not reap, watched by pidfd."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

from hostos.adopted import UNKNOWN_STATUS, AdoptedProcess
from hostos.procs import signal_child, wait_process


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def test_a_signal_reaches_it_and_the_parents_status_is_its_status() -> None:
    child = _sleeper()

    async def main() -> tuple[int | None, int, int | None]:
        status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        proc = AdoptedProcess.open(child.pid, status)
        before = proc.returncode
        signal_child(proc, signal.SIGTERM)  # through the pidfd
        await asyncio.to_thread(child.wait)  # its parent reaps it, then says how it ended
        status.set_result(child.returncode)
        code = await proc.wait()
        proc.close()
        return before, code, proc.returncode

    before, code, after = asyncio.run(main())
    assert before is None and code == after == -signal.SIGTERM


def test_an_exit_nobody_reports_counts_as_killed() -> None:
    child = _sleeper()

    async def main() -> int | None:
        status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        proc = AdoptedProcess.open(child.pid, status)
        child.kill()
        code = await wait_process(proc, 5.0)
        proc.close()
        return code

    started = time.monotonic()
    assert asyncio.run(main()) == UNKNOWN_STATUS
    assert time.monotonic() - started < 4  # the parent's word is awaited about a second
    child.wait()


def test_a_status_told_before_the_exit_waits_for_the_exit() -> None:
    child = _sleeper()

    async def main() -> tuple[int | None, int | None]:
        status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        proc = AdoptedProcess.open(child.pid, status)
        status.set_result(0)
        early = await wait_process(proc, 0.3)
        child.kill()
        late = await wait_process(proc, 5.0)
        proc.close()
        proc.send_signal(signal.SIGKILL)  # closed and exited: nothing happens
        return early, late

    assert asyncio.run(main()) == (None, 0)
    child.wait()
