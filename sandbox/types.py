"""Plain data the shim hands to a sandbox: no protobuf or containerd types cross this line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.errors import InvalidArgumentError

# containerd's identifier grammar (identifiers.Validate), which also keeps ids path-safe.
_ID_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_ID_LENGTH = 76


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid id, else raise InvalidArgumentError."""
    if not value or len(value) > MAX_ID_LENGTH or not _ID_RE.match(value):
        raise InvalidArgumentError(
            f"invalid {kind} id {value!r}: use 1-{MAX_ID_LENGTH} letters, digits and "
            "single '.', '_' or '-' between them"
        )
    return value


@dataclass(frozen=True)
class Mount:
    """One rootfs mount as containerd describes it (type, source, target, options)."""

    type: str
    source: str
    target: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class ContainerConfig:
    """Everything needed to create a container in the guest."""

    container_id: str
    bundle: Path
    rootfs: tuple[Mount, ...]
    spec: dict[str, Any]
    terminal: bool
    stdin: bool


@dataclass(frozen=True)
class ExecConfig:
    """An extra process to run in an existing container."""

    container_id: str
    exec_id: str
    process: dict[str, Any]
    terminal: bool
    stdin: bool
