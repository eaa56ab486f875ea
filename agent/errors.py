"""Errors the agent core raises, each carrying the ttrpc/gRPC status code it maps to.

Theory of operation
-------------------
The container and process logic must not depend on the wire (it is unit-tested without a
ttrpc server), so it raises :class:`AgentError` subclasses whose ``code`` holds the gRPC
status number. ``agent.service`` converts them to ``ttrpc.TtrpcError`` at the API edge.
"""

from __future__ import annotations

# gRPC status numbers (same values as ttrpc.Code; duplicated so the core stays wire-free).
UNKNOWN = 2
INVALID_ARGUMENT = 3
NOT_FOUND = 5
ALREADY_EXISTS = 6
FAILED_PRECONDITION = 9
INTERNAL = 13


class AgentError(Exception):
    """Base: ``code`` is the status the host receives, ``str(self)`` the message."""

    code = UNKNOWN


class InvalidArgument(AgentError):
    code = INVALID_ARGUMENT


class NotFound(AgentError):
    code = NOT_FOUND


class AlreadyExists(AgentError):
    code = ALREADY_EXISTS


class FailedPrecondition(AgentError):
    code = FAILED_PRECONDITION


class Internal(AgentError):
    code = INTERNAL
