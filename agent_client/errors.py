"""What a failed agent call raises: the transport stays inside agent_client.

The guest is untrusted, so its error text is cut to ``MAX_GUEST_MESSAGE`` here, at the
boundary, before it can reach containerd's errors or logs.
"""

from __future__ import annotations

from ttrpc import Code

MAX_GUEST_MESSAGE = 2048


def bounded(text: str, limit: int = MAX_GUEST_MESSAGE) -> str:
    """``text`` cut to a size fit for errors and logs."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class AgentCallError(Exception):
    """An agent call failed; ``code`` is the status (the agent's, or UNAVAILABLE when the
    connection is gone, DEADLINE_EXCEEDED on a timeout)."""

    def __init__(self, method: str, code: Code, message: str) -> None:
        self.method = method
        self.code = code
        self.message = bounded(message)
        super().__init__(f"{method}: {self.message or code.name}")
