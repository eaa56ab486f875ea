"""sandbox.guest.Guest.hand_over: the host's clock and entropy to a VM restored from a template."""

from __future__ import annotations

import asyncio
import time

import pytest

from sandbox.errors import SandboxError, UnavailableError
from sandbox.guest import RESEED_BYTES, Guest
from tests.unit.fakes import FakeAgent


def test_hand_over_sends_the_host_time_then_fresh_entropy() -> None:
    agent = FakeAgent()
    guest = Guest(lambda: agent)
    before = time.time()
    asyncio.run(guest.hand_over())
    asyncio.run(guest.hand_over())
    after = time.time()
    assert [c[0] for c in agent.calls] == ["set_guest_time", "reseed_random"] * 2
    for _, sec, usec in (agent.calls[0], agent.calls[2]):
        sent = int(sec) + int(usec) / 1e6
        assert before - 1e-6 <= sent <= after and 0 <= int(usec) < 1_000_000
    seeds = [bytes.fromhex(agent.calls[i][1]) for i in (1, 3)]
    assert RESEED_BYTES == 64 and all(len(s) == 64 for s in seeds)
    assert seeds[0] != seeds[1]  # os.urandom each time, never a constant


def test_a_failed_step_is_a_sandbox_error_that_names_it() -> None:
    agent = FakeAgent(fail_at=frozenset({"set_guest_time"}))
    with pytest.raises(SandboxError, match="failed to set the guest's clock: injected"):
        asyncio.run(Guest(lambda: agent).hand_over())
    assert [c[0] for c in agent.calls] == ["set_guest_time"]  # no reseed on a failed clock

    agent = FakeAgent(fail_at=frozenset({"reseed_random"}))
    with pytest.raises(SandboxError, match="failed to reseed the guest's random number "
                                           "generator: injected"):
        asyncio.run(Guest(lambda: agent).hand_over())


def test_a_lost_agent_reads_as_unavailable() -> None:
    agent = FakeAgent()
    asyncio.run(agent.close())
    with pytest.raises(UnavailableError):
        asyncio.run(Guest(lambda: agent).hand_over())
