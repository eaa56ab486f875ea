"""One error hierarchy for the runtime, keyed to ttrpc status codes.

Layers below shim/ raise these; shim/service.py converts them to a ttrpc status in one
place (``TtrpcError(e.code, str(e))``). Messages follow ``failed to <verb> <noun>: <cause>``.
"""

from __future__ import annotations

from ttrpc.errors import Code


class SandboxError(Exception):
    """Base of every runtime error; ``code`` is the status containerd will see."""

    code: Code = Code.UNKNOWN


class NotFoundError(SandboxError):
    """The sandbox, container or process does not exist."""

    code = Code.NOT_FOUND


class AlreadyExistsError(SandboxError):
    """An id is already in use."""

    code = Code.ALREADY_EXISTS


class FailedPreconditionError(SandboxError):
    """The operation is not allowed in the current state."""

    code = Code.FAILED_PRECONDITION


class InvalidArgumentError(SandboxError):
    """The request or the configuration is wrong; the message says how to fix it."""

    code = Code.INVALID_ARGUMENT


class UnavailableError(SandboxError):
    """The VM or its agent is gone or not reachable."""

    code = Code.UNAVAILABLE


class ResourceExhaustedError(SandboxError):
    """The host ran out of something (space in the state directory, ...)."""

    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceededError(SandboxError):
    """Something took longer than its timeout."""

    code = Code.DEADLINE_EXCEEDED
