"""Host side of the agent API."""

from agent_client.client import AgentClient, GuestDetails, StorageSpec
from agent_client.errors import AgentCallError, bounded

__all__ = ["AgentCallError", "AgentClient", "GuestDetails", "StorageSpec", "bounded"]
