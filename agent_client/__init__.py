"""Host side of the agent API: `AgentApi` (what the sandbox calls), `AgentClient` (ttrpc)."""

from agent_client.api import AgentApi, AgentConnector
from agent_client.client import AgentClient, connect_agent
from agent_client.errors import AgentCallError, bounded
from agent_client.types import (
    CgroupStats,
    GuestDetails,
    GuestInterface,
    GuestNeighbour,
    GuestRoute,
    GuestStats,
    ProcessExit,
    StorageSpec,
)

__all__ = [
    "AgentApi",
    "AgentCallError",
    "AgentClient",
    "AgentConnector",
    "CgroupStats",
    "GuestDetails",
    "GuestInterface",
    "GuestNeighbour",
    "GuestRoute",
    "GuestStats",
    "ProcessExit",
    "StorageSpec",
    "bounded",
    "connect_agent",
]
