"""Validation of everything the host sends: ids, guest paths, sizes, signals.

Theory of operation
-------------------
The host is outside the VM's trust boundary: an id becomes a directory name and a crun
argument, a path becomes a mount point. Each check either returns the cleaned value or
raises :class:`agent.errors.InvalidArgument` naming the field, so handlers stay one-liners.
"""

from __future__ import annotations

import os
import re

from agent.errors import InvalidArgument

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# Upper bound on one ReadStdout/ReadStderr answer: keeps a ttrpc frame well under 4 MiB.
MAX_READ = 1 << 20
MAX_WRITE = 1 << 20
MAX_SPEC = 1 << 20


def check_id(field: str, value: str) -> str:
    """A container or exec id: safe as a file name and as a crun argument."""
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"invalid {field} {value!r}: want [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}")
    return value


def check_exec_id(value: str) -> str:
    """An exec id; "" addresses the container's init process."""
    return value if value == "" else check_id("exec_id", value)


def check_guest_path(field: str, path: str, root: str) -> str:
    """An absolute path that stays under ``root`` after normalisation (no ``..`` escapes)."""
    if not path.startswith("/") or "\0" in path:
        raise InvalidArgument(f"{field} {path!r} must be an absolute path")
    norm = os.path.normpath(path)
    root = os.path.normpath(root)
    if norm != root and not norm.startswith(root + "/"):
        raise InvalidArgument(f"{field} {path!r} must be under {root}")
    return norm


def read_len(requested: int) -> int:
    """Bytes to read for a stream request: 0 means "the maximum"; capped at MAX_READ."""
    return MAX_READ if requested == 0 else min(requested, MAX_READ)


def check_size(field: str, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidArgument(f"{field} is {size} bytes; the limit is {limit}")


def check_signal(sig: int) -> int:
    # 0 sends nothing and asks whether the process is still there (kill(2)).
    if not 0 <= sig <= 64:
        raise InvalidArgument(f"invalid signal {sig}")
    return sig
