"""Host side of the agent API."""

from agent_client.client import AgentClient, GuestDetails, StorageSpec

__all__ = ["AgentClient", "GuestDetails", "StorageSpec"]
