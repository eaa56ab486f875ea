"""`AgentApi`: the agent calls the sandbox layer makes, as plain Python values.

`agent_client.client.AgentClient` implements it over ttrpc; unit tests use fakes. Every
method raises `AgentCallError` on failure (code + bounded guest text).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from agent_client.types import (
    CgroupStats,
    GuestDetails,
    GuestInterface,
    GuestNeighbour,
    GuestRoute,
    GuestStats,
    ProcessExit,
    StorageSpec,
)


class AgentApi(Protocol):
    """One connection to one sandbox's agent."""

    # -- connection and sandbox
    async def close(self) -> None:
        """Close the connection (idempotent)."""

    async def wait_closed(self) -> None:
        """Return once the connection has ended (EOF, I/O error, protocol violation)."""

    async def health_check(self, timeout: float) -> None:
        """The agent answers a Check within ``timeout``."""

    async def guest_details(self) -> GuestDetails:
        """Kernel release, agent version and start-up times."""

    async def guest_stats(self) -> GuestStats:
        """The guest's memory and load averages (for metrics)."""

    async def create_sandbox(
        self, sandbox_id: str, hostname: str, storages: Iterable[StorageSpec]
    ) -> None:
        """Hostname and the shared filesystems."""

    async def destroy_sandbox(self) -> None:
        """Stop every container and unmount."""

    # -- containers and processes
    async def create_container(
        self, container_id: str, spec: dict[str, Any], terminal: bool, stdin: bool
    ) -> None:
        """Create (not start) a container from its guest spec."""

    async def start_container(self, container_id: str) -> int:
        """Start the init process; its guest pid."""

    async def exec_process(
        self, container_id: str, exec_id: str, process: dict[str, Any], stdin: bool
    ) -> int:
        """Start an exec; its guest pid."""

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all: bool = False
    ) -> None:
        """Signal one process, or all of the container's."""

    async def wait_process(self, container_id: str, exec_id: str) -> ProcessExit:
        """Long poll: the exit status, and whether an OOM kill ended it."""

    # -- cgroup of a container
    async def pause_container(self, container_id: str) -> None:
        """Freeze the container's cgroup."""

    async def resume_container(self, container_id: str) -> None:
        """Thaw it."""

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI LinuxResources."""

    async def stats_container(self, container_id: str) -> CgroupStats:
        """The container's cgroup figures."""

    # -- the VM
    async def update_interface(self, interface: GuestInterface) -> None:
        """Set up one guest NIC (found by MAC) as the pod interface it copies."""

    async def update_routes(self, routes: Iterable[GuestRoute]) -> None:
        """Add the pod's routes in the guest."""

    async def add_arp_neighbors(self, neighbours: Iterable[GuestNeighbour]) -> None:
        """Add permanent neighbour entries in the guest."""

    async def listening_ports(self) -> list[int]:
        """TCP ports listening in the guest."""

    async def port_forward_open(self, port: int) -> int:
        """Open a connection to ``port`` on the guest's loopback; its id."""

    async def port_forward_read(self, conn_id: int, size: int) -> bytes:
        """The next bytes from the guest (b"" at end of stream)."""

    async def port_forward_write(self, conn_id: int, data: bytes) -> None:
        """Bytes to the guest's end of the connection."""

    async def port_forward_close_write(self, conn_id: int) -> None:
        """No more bytes to the guest."""

    async def port_forward_close(self, conn_id: int) -> None:
        """Forget the connection."""

    async def online_cpus(self, wanted: int) -> int:
        """Bring hot-plugged vCPUs online (waits, bounded, for ``wanted``); how many are."""

    async def online_memory(self, wanted_mib: int) -> int:
        """Bring hot-plugged memory online (waits, bounded); the MiB online."""

    async def set_guest_time(self, sec: int, usec: int) -> None:
        """Set the guest's wall clock (a VM restored from a template wakes with a stale one)."""

    async def reseed_random(self, data: bytes) -> None:
        """Mix ``data`` into the guest kernel's RNG and reseed it (clones of a template
        share its RNG state)."""

    async def list_processes(self, container_id: str) -> list[int]:
        """Guest pids of the container."""

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        """Forget an exec that has exited."""

    async def remove_container(self, container_id: str, timeout: int = 0) -> None:
        """Kill what is left and forget it."""

    # -- stdio
    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        """Long poll; b"" at end of stream."""

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        """Long poll; b"" at end of stream."""

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """The bytes taken."""

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        """EOF on the process's stdin."""

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        """Set the pty size."""


#: Dial an agent address within a timeout (the whole guest boot fits in it).
AgentConnector = Callable[[str, float], Awaitable[AgentApi]]
