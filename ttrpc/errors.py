"""ttrpc status codes and the one exception type that carries them.

A ttrpc Response carries a ``google.rpc.Status``; its ``code`` uses the gRPC code numbers,
mirrored by :class:`Code`. Both sides of a connection speak in :class:`TtrpcError`:

- a server handler raises ``TtrpcError(Code.NOT_FOUND, "...")`` and the caller receives that
  status; any other exception becomes ``Code.UNKNOWN`` with ``str(exc)``;
- a client ``call`` raises ``TtrpcError`` with the remote status, or with a local code:
  ``DEADLINE_EXCEEDED`` (the call's timeout expired), ``UNAVAILABLE`` (the connection is
  closed or could not be made), ``RESOURCE_EXHAUSTED`` (a message exceeds 4 MiB) or
  ``INTERNAL`` (an undecodable response).
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes, as carried in ``google.rpc.Status.code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """The code for a wire value; numbers outside 0-16 become ``UNKNOWN``."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(Exception):
    """A ttrpc status other than OK: ``TtrpcError(Code.NOT_FOUND, "container x not found")``."""

    def __init__(self, code: Code, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"TtrpcError({self.code!r}, {self.message!r})"
