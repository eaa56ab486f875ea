"""`hypervisors.held`: a VMM (here `sleep`) started under its holder, given away, and
watched; the holder's words are checked before they count."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from hostos.procs import start_time
from hypervisors.held import HeldVmm, watch


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) is None:
            return True
        time.sleep(0.02)
    return False


def test_a_vmm_given_away_lives_as_long_as_its_new_owner_holds_it() -> None:
    async def main() -> tuple[int, int]:
        held = await HeldVmm.start(["sleep", "60"], (), False, None)
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


def test_the_exit_status_reaches_the_owner() -> None:
    async def main() -> int:
        held = await HeldVmm.start(["sh", "-c", "exit 7"], (), False, None)
        code = await asyncio.wait_for(held.process.wait(), 10)
        await held.close()
        return code

    assert asyncio.run(main()) == 7


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
