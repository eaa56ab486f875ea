"""The operator's side of the VM cache (``kata-runtime factory status|destroy``): ask a
running cache how it is, or to stop. Blocking and short: the CLI has no event loop."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from hypervisors import vmcache_wire as wire

TIMEOUT = 5.0


def ask(endpoint: Path, op: str) -> dict[str, Any]:
    """The cache's answer to ``op`` (``describe`` or ``stop``); OSError if none serves
    ``endpoint``, `wire.WireError` if it answered something else."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(endpoint))
        sock.sendall(wire.encode({"op": op}))
        buffer = b""
        while True:
            line, _rest = wire.split_line(buffer)
            if line is not None:
                return wire.decode(line)
            data = sock.recv(4096)
            if not data:
                raise wire.WireError("the VM cache closed the connection without answering")
            buffer += data
