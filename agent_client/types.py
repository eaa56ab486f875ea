"""Plain values of the agent API (no protobuf types)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageSpec:
    """A filesystem for the agent to mount in the guest."""

    driver: str
    source: str
    fstype: str
    mount_point: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestDetails:
    """What the guest says about itself."""

    kernel_release: str
    agent_version: str
    agent_startup_seconds: float
    agent_init_seconds: float
