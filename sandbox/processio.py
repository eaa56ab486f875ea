"""What a process's stdio is to the sandbox layer: endpoints the shim opens and hands in.

The containerd-facing layer implements these over FIFOs, ``file://`` and ``binary://``
(`shim.stdio`); the pod calls an `IoOpener` once its checks passed and owns what it
returns from then on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class OutputSink(Protocol):
    """Where a process's stdout or stderr goes (the shim's FIFO, file or logger)."""

    async def write(self, data: bytes) -> None:
        """Write all of ``data`` (or drop it once the reader is gone for good)."""

    def close(self) -> None:
        """Close: the reader sees EOF."""


class InputSource(Protocol):
    """Where a process's stdin comes from."""

    async def read(self) -> bytes:
        """The next bytes; ``b""`` at EOF."""

    def try_read(self) -> bytes | None:
        """Bytes available now, ``b""`` at EOF, None when nothing is pending."""

    async def close(self) -> None:
        """Stop reading (idempotent)."""


class ProcessIO(Protocol):
    """The opened endpoints of one process; None means that stream is not wanted."""

    @property
    def stdin(self) -> InputSource | None:
        """The stdin source."""

    @property
    def stdout(self) -> OutputSink | None:
        """The stdout sink."""

    @property
    def stderr(self) -> OutputSink | None:
        """The stderr sink."""

    async def close(self) -> None:
        """Close every endpoint (idempotent)."""


#: Opens a process's endpoints; the pod calls it once its checks passed and then owns the
#: result (it closes it on any failure).
IoOpener = Callable[[], Awaitable[ProcessIO]]
