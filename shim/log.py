"""Structured logging for the shim: one logfmt line per event.

Theory of operation
-------------------
Every line looks like ``time=2026-01-02T03:04:05.678901Z level=info msg="container started"
sandbox=pod1 container=c1 pid=42``: a timestamp, the level, the message, then the fields the
caller attached with :func:`kv` (``log.info("...", extra=kv(container=cid))``) and the fields
fixed for the whole process (``sandbox=``, ``namespace=``).

Where lines go:

- the daemon writes to the ``log`` FIFO in its bundle, which containerd reads and copies to
  its own log. The FIFO is opened ``O_WRONLY|O_NONBLOCK``; a full pipe (EAGAIN) drops the
  line instead of blocking the event loop, and a departed reader (EPIPE, ENXIO: containerd
  restarted) closes the fd and retries the open at most once a second;
- ``start`` and ``delete`` write to stderr (``delete``'s stderr is only logged by containerd;
  ``start`` logs nothing on success because its output is the address).

``-debug`` lowers the level from info to debug.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from sandbox.logfields import FIELDS_ATTR, kv

__all__ = ["FifoHandler", "LogfmtFormatter", "kv", "setup_daemon", "setup_stderr"]

_RESERVED = ("time", "level", "msg")


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t') and text.isprintable():
        return text
    for raw, cooked in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\t", "\\t")):
        text = text.replace(raw, cooked)
    return f'"{text}"'


class LogfmtFormatter(logging.Formatter):
    """Format records as logfmt, with fixed process-wide fields appended."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        """One logfmt line (no newline) for ``record``."""
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        parts = [
            f"time={when.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}",
            f"level={record.levelname.lower()}",
            f"msg={_quote(record.getMessage())}",
        ]
        fields: dict[str, object] = dict(self._static)
        fields.update(getattr(record, FIELDS_ATTR, None) or {})
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = record.exc_info[1]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items() if k not in _RESERVED]
        if record.name not in ("root", "shim", "sandbox"):
            parts.append(f"logger={record.name}")
        return " ".join(parts)


class FifoHandler(logging.Handler):
    """Write lines to a FIFO without ever blocking; drop them when it is full or gone."""

    RETRY_SECONDS = 1.0

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.dropped = 0
        self._fd: int | None = None
        self._next_open = 0.0

    def _open(self) -> int | None:
        if self._fd is not None:
            return self._fd
        now = time.monotonic()
        if now < self._next_open:
            return None
        self._next_open = now + self.RETRY_SECONDS
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # no reader (ENXIO) or no FIFO: try again later
        return self._fd

    def emit(self, record: logging.LogRecord) -> None:
        """Write one line, or drop it."""
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        fd = self._open()
        if fd is None:
            self.dropped += 1
            return
        try:
            os.write(fd, line)
        except BlockingIOError:
            self.dropped += 1
        except OSError as e:
            self.dropped += 1
            if e.errno in (errno.EPIPE, errno.ENXIO, errno.EBADF):
                self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Close the FIFO."""
        self._close_fd()
        super().close()


def _install(handler: logging.Handler, debug: bool, static: Mapping[str, object]) -> None:
    handler.setFormatter(LogfmtFormatter(static))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("asyncio").setLevel(logging.INFO)  # no selector chatter under -debug
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # nor a line per netlink message


def setup_daemon(bundle: Path, debug: bool, **static: object) -> FifoHandler:
    """Send every log line of the daemon to ``<bundle>/log``."""
    handler = FifoHandler(bundle / "log")
    _install(handler, debug, static)
    return handler


def setup_stderr(debug: bool, **static: object) -> None:
    """Send log lines to stderr (``start`` and ``delete``)."""
    _install(logging.StreamHandler(sys.stderr), debug, static)
