"""Plain data the shim hands to a sandbox: no protobuf or containerd types cross this line."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.errors import InvalidArgumentError

# containerd's identifier grammar (identifiers.Validate), which also keeps ids path-safe.
_ID_RE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
MAX_ID_LENGTH = 76


def validate_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid id, else raise InvalidArgumentError."""
    if not value or len(value) > MAX_ID_LENGTH or not _ID_RE.fullmatch(value):
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


@dataclass(frozen=True)
class PodResources:
    """What the pod may use, as its sandbox container's OCI spec says (None: unlimited)."""

    cpu_quota: int | None = None
    cpu_period: int | None = None
    memory_limit_bytes: int | None = None


@dataclass(frozen=True)
class SandboxSpec:
    """How to start a sandbox: read once from the OCI spec of its sandbox container."""

    hostname: str = ""
    #: The pod's network namespace ("" when the spec names none: the host's).
    netns_path: str = ""
    #: The spec has no network namespace at all: the pod wants the host's (refused).
    host_network: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)
    resources: PodResources = PodResources()
    #: The sandbox container's ``linux.cgroupsPath`` (a child of the pod's cgroup).
    cgroups_path: str = ""


@dataclass(frozen=True)
class StdioPaths:
    """The stream names containerd gave for a process (kept for State and events)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
