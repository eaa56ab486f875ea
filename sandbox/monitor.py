"""A point-in-time reading of one pod for the metrics endpoint (no exposition format here).

`snapshot` reads, concurrently: the host processes (the shim itself, the VMM and its
helpers, from /proc in a worker thread: smaps_rollup of a VMM walks its page tables), and,
while the sandbox runs, the guest's memory and load and each live container's cgroup
figures from the agent. Every agent call is timed (the endpoint reports the round trip)
and bounded by :data:`AGENT_TIMEOUT`: a slow or broken guest costs a scrape its guest
figures, never the scrape. A process that is gone, or whose pid was reused, is left out.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from agent_client import CgroupStats, GuestStats
from hostos.procs import start_time
from hostos.procstat import ProcessSample, sample
from sandbox.errors import SandboxError
from sandbox.pod import Pod
from sandbox.sandbox import SandboxState
from sandbox.state import ProcessRecord
from sandbox.threads import in_thread

__all__ = ["AgentCall", "CgroupStats", "GuestStats", "PodSnapshot", "ProcessSample", "snapshot"]

#: Seconds an agent call of a scrape may take (a TCG guest answers in tens of ms).
AGENT_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class AgentCall:
    """One agent call a scrape made: how long it took and whether it answered."""

    method: str
    seconds: float
    ok: bool


@dataclass
class PodSnapshot:
    """What the endpoint reports about one pod."""

    sandbox_id: str
    shim: ProcessSample | None = None
    #: The VMM and its helpers by role (``vmm``, then the hypervisor's helper roles).
    processes: dict[str, ProcessSample] = field(default_factory=dict)
    guest: GuestStats | None = None
    containers: dict[str, CgroupStats] = field(default_factory=dict)
    agent_calls: list[AgentCall] = field(default_factory=list)


def _sample_processes(records: list[ProcessRecord]) -> dict[str, ProcessSample]:
    found: dict[str, ProcessSample] = {}
    for r in records:
        reading = sample(r.pid, r.start_time)
        if reading is not None and r.role not in found:
            found[r.role] = reading
    return found


def _sample_shim() -> ProcessSample | None:
    return sample(os.getpid(), start_time(os.getpid()))


async def _timed(method: str, call: Awaitable[T], calls: list[AgentCall]) -> T | None:
    """``call``'s result (None if it failed or timed out), its timing added to ``calls``."""
    began = time.monotonic()
    try:
        result: T | None = await asyncio.wait_for(call, AGENT_TIMEOUT)
    except (SandboxError, OSError):  # TimeoutError too
        result = None
    calls.append(AgentCall(method, time.monotonic() - began, result is not None))
    return result


async def snapshot(pod: Pod) -> PodSnapshot:
    """Read the pod's figures now (see the module docstring)."""
    sandbox = pod.sandbox
    snap = PodSnapshot(sandbox.id)
    host = asyncio.ensure_future(in_thread(_sample_processes, sandbox.host_processes()))
    if sandbox.state is SandboxState.RUNNING:
        ids = pod.live_containers()
        guest, *stats = await asyncio.gather(
            _timed("GetGuestStats", sandbox.guest.guest_stats(), snap.agent_calls),
            *(_timed("StatsContainer", pod.stats(cid), snap.agent_calls) for cid in ids),
        )
        snap.guest = guest if isinstance(guest, GuestStats) else None
        snap.containers = {cid: s for cid, s in zip(ids, stats, strict=True)
                           if isinstance(s, CgroupStats)}
    snap.processes = await host
    snap.shim = await in_thread(_sample_shim)
    return snap
