"""Plain values of the agent API (no protobuf types)."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class GuestStats:
    """The guest's memory (bytes) and load, as it reports them (checked by the client)."""

    mem_total_bytes: int = 0
    mem_free_bytes: int = 0
    mem_available_bytes: int = 0
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    uptime_seconds: float = 0.0
    agent_rss_bytes: int = 0


@dataclass(frozen=True)
class ProcessExit:
    """How a process ended: its status (code, or 128+signal) and, for a container's init
    process, whether its cgroup's memory limit killed a process (an OOM kill)."""

    status: int
    oom_killed: bool = False


@dataclass(frozen=True)
class CgroupStats:
    """A container's cgroup v2 figures as the guest reports them (bounded by the client)."""

    cpu_stat: dict[str, int] = field(default_factory=dict)
    memory_stat: dict[str, int] = field(default_factory=dict)
    memory_events: dict[str, int] = field(default_factory=dict)
    memory_current: int = 0
    memory_max: int = 0  # 0: no limit
    memory_swap_current: int = 0
    pids_current: int = 0
    pids_max: int = 0  # 0: no limit


@dataclass(frozen=True)
class GuestInterface:
    """A guest NIC to set up: found by ``mac``, renamed to ``name``, given MTU and
    addresses (``addr/prefix``)."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuestRoute:
    """A route for the guest; ``destination`` "" is the default route."""

    device: str
    destination: str = ""
    gateway: str = ""
    source: str = ""
    ipv6: bool = False


@dataclass(frozen=True)
class GuestNeighbour:
    """A permanent ARP/NDP entry for the guest."""

    device: str
    address: str
    mac: str
