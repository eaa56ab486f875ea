"""GetGuestStats end to end: the agent's real handler, our ttrpc, the host's AgentClient;
and what the client does with hostile numbers from a guest."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from agent.container import Containers, RuntimeConfig
from agent.reaper import Reaper
from agent.service import AgentService, StartupInfo
from agent.storage import Storages
from agent_client import AgentClient, GuestStats
from agent_client.client import SERVICE
from protocols import agent_pb2 as pb
from ttrpc import Server

Handler = Callable[[Any], Awaitable[Message]]


async def ask(tmp_path: Path, methods: dict[str, tuple[type[Message], Handler]]) -> GuestStats:
    async def check(req: Any) -> Message:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    server = Server()
    server.register(SERVICE, {"Check": (pb.CheckRequest, check), **methods})
    path = tmp_path / "agent.sock"
    listener = await asyncio.start_unix_server(server.serve_connection, str(path))
    try:
        agent = await AgentClient.connect(f"serial://{path}", timeout=5)
        try:
            return await agent.guest_stats()
        finally:
            await agent.close()
    finally:
        listener.close()


def test_the_agents_handler_reports_this_hosts_memory_and_load(tmp_path: Path) -> None:
    containers = Containers(RuntimeConfig(run_dir=str(tmp_path), cgroup_parent=""), Reaper())
    service = AgentService(containers, Storages(str(tmp_path)), StartupInfo(), False)
    table = service.methods()
    stats = asyncio.run(ask(tmp_path, {"GetGuestStats": table["GetGuestStats"]}))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert stats.mem_total_bytes == int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < stats.mem_available_bytes <= stats.mem_total_bytes
    assert stats.uptime_seconds > 0 and stats.load1 >= 0


def test_hostile_numbers_read_as_zero(tmp_path: Path) -> None:
    async def hostile(req: Any) -> Message:
        return pb.GuestStatsResponse(mem_total_bytes=2**64 - 1, load1=math.nan, load5=-3.0,
                                     load15=math.inf, uptime_seconds=-math.inf)

    stats = asyncio.run(ask(tmp_path, {"GetGuestStats": (pb.GuestStatsRequest, hostile)}))
    assert stats == GuestStats(mem_total_bytes=2**64 - 1)
