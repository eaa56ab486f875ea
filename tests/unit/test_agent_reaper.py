"""agent.reaper: dispatch by pid, exits before registration, real children."""

from __future__ import annotations

import asyncio
import os
import signal

from agent.reaper import Reaper, exit_status


def test_exit_status_shell_convention() -> None:
    assert exit_status(3 << 8) == 3        # exited with 3
    assert exit_status(signal.SIGKILL) == 137


def test_dispatch_to_registered_waiter() -> None:
    async def main() -> None:
        reaper = Reaper()
        fut = reaper.register(4242)
        assert reaper.register(4242) is fut  # one future per pid
        reaper.dispatch(4242, 7)
        assert await fut == 7

    asyncio.run(main())


def test_exit_before_registration_is_kept() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.dispatch(4243, 137)           # the pid died before we learnt it
        assert await reaper.register(4243) == 137
        # claimed once: a later registration of the same (reused) pid waits again
        assert not reaper.register(4243).done()

    asyncio.run(main())


def test_unclaimed_table_is_bounded() -> None:
    async def main() -> None:
        reaper = Reaper()
        for pid in range(1, 3000):
            reaper.dispatch(pid, 0)
        assert not reaper.register(1).done()   # oldest dropped
        assert reaper.register(2999).done()

    asyncio.run(main())


def test_spawn_and_reap_real_children() -> None:
    async def main() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                _, ok = reaper.spawn(["/bin/sh", "-c", "exit 5"], null, null, null)
                _, killed = reaper.spawn(["/bin/sh", "-c", "kill -9 $$"], null, null, null)
                statuses = await asyncio.wait_for(asyncio.gather(ok, killed), 10)
            finally:
                os.close(null)
            assert statuses == [5, 137]
        finally:
            reaper.uninstall()

    asyncio.run(main())
