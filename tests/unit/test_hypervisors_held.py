"""`hypervisors.held`: a VMM (here `sleep`) started under its holder, given away, and
watched; the holder's words are checked before they count."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from hostos.procs import start_time
from hypervisors.errors import HypervisorError
from hypervisors.held import HeldVmm, watch


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) is None:
            return True
        time.sleep(0.02)
    return False


def test_a_vmm_given_away_lives_as_long_as_its_new_owner_holds_it(tmp_path: Path) -> None:
    log = tmp_path / "vmm.stderr"

    async def main() -> tuple[int, int]:
        held = await HeldVmm.start(["sleep", "60"], (), False, None, log)
        pid = held.process.pid
        assert start_time(pid) is not None and held.process.returncode is None
        fd = held.give_away()
        await held.close()  # the cache is done with it
        await asyncio.sleep(0.3)
        assert start_time(pid) is not None  # the new owner still holds it
        return pid, fd

    pid, fd = asyncio.run(main())
    os.close(fd)  # the new owner goes (a shim killed with -9)
    assert _gone(pid)


def test_the_exit_status_reaches_the_owner(tmp_path: Path) -> None:
    log = tmp_path / "vmm.stderr"

    async def main() -> int:
        held = await HeldVmm.start(["sh", "-c", "sleep 0.5; exit 7"], (), False, None, log)
        code = await asyncio.wait_for(held.process.wait(), 10)
        await held.close()
        await held.stderr.stop()
        return code

    assert asyncio.run(main()) == 7


def test_a_vmm_that_fails_at_once_leaves_its_stderr_and_status(tmp_path: Path) -> None:
    """Either the start fails quoting the VMM's stderr, or (the holder said hello before
    it exited) the VMM's exit comes at once: the caller's QMP connect then quotes it."""
    log = tmp_path / "vmm.stderr"

    async def main() -> tuple[int | None, str]:
        try:
            held = await HeldVmm.start(["sh", "-c", "echo bad machine type >&2; exit 1"],
                                       (), False, None, log)
        except HypervisorError as e:
            return None, str(e)
        code = await asyncio.wait_for(held.process.wait(), 10)
        await held.stderr.finished(2.0)
        await held.close()
        await held.stderr.stop()
        return code, ""

    code, error = asyncio.run(main())
    assert code == 1 or "stderr:\nbad machine type" in error, (code, error)
    assert "bad machine type" in log.read_text()


@pytest.mark.parametrize("sent", [b"not json\n", b"[1]\n", b"x" * 5000])
def test_garbage_from_a_holder_counts_for_nothing(sent: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> bool:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.sendall(sent)
        status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await asyncio.wait_for(watch(ours, status), 5)
        ours.close()
        theirs.close()
        return status.done()

    assert asyncio.run(main()) is False
    assert "VM holder" in caplog.text
