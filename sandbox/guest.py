"""`Guest`: the agent's process and stdio calls, in the runtime's error hierarchy.

Every call goes to the sandbox's current agent connection (``UNAVAILABLE`` when the sandbox
is not running) and turns an `AgentCallError` into the `SandboxError` of the same status
code, with a ``failed to <verb> <noun>`` message; the guest's text is already bounded.
`sandbox.process.Process` drives processes through this object only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from agent_client import AgentApi, AgentCallError, CgroupStats, GuestStats, ProcessExit
from sandbox.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SandboxError,
    UnavailableError,
)
from ttrpc import Code

_ERRORS_BY_CODE: dict[Code, type[SandboxError]] = {
    Code.NOT_FOUND: NotFoundError,
    Code.ALREADY_EXISTS: AlreadyExistsError,
    Code.FAILED_PRECONDITION: FailedPreconditionError,
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.UNAVAILABLE: UnavailableError,
    Code.CANCELLED: UnavailableError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
}


@contextlib.asynccontextmanager
async def agent_errors(what: str) -> AsyncIterator[None]:
    """Turn an agent's error into the runtime's hierarchy, keeping its code."""
    try:
        yield
    except AgentCallError as e:  # its message is already bounded (untrusted guest text)
        kind = _ERRORS_BY_CODE.get(e.code, SandboxError)
        raise kind(f"failed to {what}: {e.message or e.code.name}") from e


#: Bytes of the host's entropy that reseed a restored guest's RNG (512 bits).
RESEED_BYTES = 64


def _name(container_id: str, exec_id: str) -> str:
    return f"{container_id}/{exec_id or 'init'}"


class Guest:
    """Process calls on whichever agent connection ``agent()`` returns."""

    def __init__(self, agent: Callable[[], AgentApi]) -> None:
        self._agent = agent

    # a VM restored from a template
    async def hand_over(self) -> None:
        """Make a VM restored from a template its own: set its wall clock (it wakes with
        the template's, stale) to the host's, then reseed its kernel RNG (every clone of
        the template shares the template's state) with fresh host entropy."""
        sec, nsec = divmod(time.time_ns(), 1_000_000_000)
        async with agent_errors("set the guest's clock"):
            await self._agent().set_guest_time(sec, nsec // 1000)
        async with agent_errors("reseed the guest's random number generator"):
            await self._agent().reseed_random(os.urandom(RESEED_BYTES))

    # lifecycle
    async def start_container(self, container_id: str) -> int:
        """Start a container's init process; its guest pid."""
        async with agent_errors(f"start container {container_id}"):
            return await self._agent().start_container(container_id)

    async def exec_process(
        self, container_id: str, exec_id: str, process: dict[str, Any], stdin: bool
    ) -> int:
        """Start an exec; its guest pid."""
        async with agent_errors(f"start exec {exec_id} in {container_id}"):
            return await self._agent().exec_process(container_id, exec_id, process, stdin)

    async def wait_process(self, container_id: str, exec_id: str) -> ProcessExit:
        """Wait for the process to exit; its status (code, or 128+signal)."""
        async with agent_errors(f"wait for {_name(container_id, exec_id)}"):
            return await self._agent().wait_process(container_id, exec_id)

    # cgroup of a container
    async def pause_container(self, container_id: str) -> None:
        """Freeze the container."""
        async with agent_errors(f"pause container {container_id}"):
            await self._agent().pause_container(container_id)

    async def resume_container(self, container_id: str) -> None:
        """Thaw the container."""
        async with agent_errors(f"resume container {container_id}"):
            await self._agent().resume_container(container_id)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI LinuxResources to the container in the guest."""
        async with agent_errors(f"update the resources of container {container_id}"):
            await self._agent().update_container(container_id, resources)

    async def online_cpus(self, wanted: int) -> int:
        """Have the guest bring hot-plugged vCPUs online; how many are online."""
        async with agent_errors("bring hot-plugged vCPUs online"):
            return await self._agent().online_cpus(wanted)

    async def online_memory(self, wanted_mib: int) -> int:
        """Have the guest bring hot-plugged memory online; the MiB online."""
        async with agent_errors("bring hot-plugged memory online"):
            return await self._agent().online_memory(wanted_mib)

    async def stats_container(self, container_id: str) -> CgroupStats:
        """The container's cgroup figures, from the guest."""
        async with agent_errors(f"collect the stats of container {container_id}"):
            return await self._agent().stats_container(container_id)

    async def guest_stats(self) -> GuestStats:
        """The guest's memory and load averages."""
        async with agent_errors("collect the guest's stats"):
            return await self._agent().guest_stats()

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all: bool = False
    ) -> None:
        """Send a signal to a process (or, with ``all``, to every process of the container)."""
        async with agent_errors(f"signal {_name(container_id, exec_id)}"):
            await self._agent().signal_process(container_id, exec_id, signal, all)

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        """Have the agent forget an exec that has exited."""
        async with agent_errors(f"remove exec {exec_id} of {container_id}"):
            await self._agent().remove_process(container_id, exec_id)

    async def list_pids(self, container_id: str) -> list[int]:
        """Guest pids of the container's processes."""
        async with agent_errors(f"list the processes of {container_id}"):
            return await self._agent().list_processes(container_id)

    # stdio
    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        """Next stdout bytes (long poll); b"" at end of stream."""
        async with agent_errors(f"read stdout of {_name(container_id, exec_id)}"):
            return await self._agent().read_stdout(container_id, exec_id)

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        """Next stderr bytes (long poll); b"" at end of stream."""
        async with agent_errors(f"read stderr of {_name(container_id, exec_id)}"):
            return await self._agent().read_stderr(container_id, exec_id)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """Write to the process's stdin; the bytes taken."""
        async with agent_errors(f"write stdin of {_name(container_id, exec_id)}"):
            return await self._agent().write_stdin(container_id, exec_id, data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        """Close the process's stdin."""
        async with agent_errors(f"close stdin of {_name(container_id, exec_id)}"):
            await self._agent().close_stdin(container_id, exec_id)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        """Set the terminal size of the process."""
        async with agent_errors(f"resize the pty of {_name(container_id, exec_id)}"):
            await self._agent().tty_win_resize(container_id, exec_id, height, width)
