"""The pod: its sandbox (VM) and its containers and processes. Their one owner.

Theory of operation
-------------------
One shim daemon serves one pod. :class:`Pod` holds every container and process of it and
decides their lifecycles; the containerd-facing layer (``shim/``) only translates Task API
requests into these calls, hands in stdio endpoints (`sandbox.types.IoOpener`) and turns
the `PodEvents` it receives into containerd events.

- The first Create boots the sandbox (``Sandbox.start`` with the `SandboxSpec` read from
  that container's OCI spec) under the boot lock; that container is the pod's sandbox
  container for CRI, or a plain ``ctr`` container that is its own pod. Later Creates add
  containers to the running VM.
- Ids are reserved before any await, so a concurrent duplicate Create gets ALREADY_EXISTS.
- Each container has one lock (rule 2 of ``process.py``): Start holds it across the start
  and the start event, the exit watcher takes it to record the exit and publish it, Delete
  holds it while it removes the container.
- The init's exit is published after its execs' exits (``before_exit`` waits for them, at
  most :data:`EXEC_EXIT_GRACE` seconds).
- The VM stops when the last container is deleted or the sandbox container itself is
  (Delete has no short deadline in containerd, Shutdown only 3 s), and again, idempotently,
  on Shutdown and SIGTERM. Processes still running then see ``wait_process`` fail and exit
  with 255.
- Endpoints handed in through an opener belong to the pod from then on: it closes them
  when the process goes, and at once when the call fails.

Task pid: guest pids mean nothing on the host (and may name an unrelated host process), so,
as Kata does, every task and exec reports the pid of the pod's VMM (the host process that
runs it), captured at boot; the shim's own pid if the sandbox cannot tell. Guest pids are
visible through `pids`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent_client import CgroupStats as CgroupStats  # re-exported: what Stats reports
from hostos.syscalls import release_free_heap
from sandbox.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from sandbox.logfields import kv
from sandbox.oci import (
    container_cpu_limit,
    container_memory_limit,
    cpu_limit,
    memory_limit,
    sandbox_spec,
)
from sandbox.process import LIVE, Op, Process, State
from sandbox.processio import IoOpener, ProcessIO
from sandbox.sandbox import Sandbox, SandboxState
from sandbox.types import ContainerConfig, ExecConfig, StdioPaths, validate_id

log = logging.getLogger("sandbox")

EXEC_EXIT_GRACE = 2.0
TERMINATE_GRACE = 5.0


class PodEvents(Protocol):
    """Where the pod reports task events (the shim turns them into containerd's)."""

    def created(self, c: ContainerConfig, paths: StdioPaths, pid: int) -> None: ...
    def started(self, container_id: str, pid: int) -> None: ...
    def exec_added(self, container_id: str, exec_id: str) -> None: ...
    def exec_started(self, container_id: str, exec_id: str, pid: int) -> None: ...
    def exited(self, p: Process, pid: int) -> None: ...
    def deleted(self, p: Process, pid: int) -> None: ...
    def oom(self, container_id: str) -> None: ...
    def paused(self, container_id: str) -> None: ...
    def resumed(self, container_id: str) -> None: ...


@dataclass
class Container:
    """A container of the pod: its init process and execs, guarded by ``lock``."""

    config: ContainerConfig
    init: Process
    lock: asyncio.Lock
    execs: dict[str, Process] = field(default_factory=dict)  # guarded by lock
    cpus: float = 0.0  # its CPU limit (quota / period); 0.0: none
    memory_bytes: int = 0  # its memory limit; 0: none

    def process(self, exec_id: str) -> Process:
        """The init ("") or the exec ``exec_id``."""
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFoundError(f"exec {exec_id} not found in {self.config.container_id}") from None

    async def wait_execs(self) -> None:
        """Wait (bounded) until every started exec has recorded its exit."""
        running = [p.wait() for p in self.execs.values() if p.state is State.RUNNING]
        if running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*running), EXEC_EXIT_GRACE)


class Pod:
    """The sandbox and containers of one daemon (see the module docstring)."""

    def __init__(self, sandbox: Sandbox, events: PodEvents) -> None:
        self.sandbox = sandbox
        self.task_pid = 0
        self._events = events
        self._boot_lock = asyncio.Lock()  # guards booting and stopping the sandbox
        self._containers: dict[str, Container] = {}
        self._reserved: set[str] = set()  # ids whose Create is in progress
        self._heap_released = False

    # lookups
    def container(self, container_id: str) -> Container:
        """A container of the pod (NOT_FOUND otherwise)."""
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFoundError(f"container {container_id} not found") from None

    def process(self, container_id: str, exec_id: str) -> Process:
        """A process of the pod (NOT_FOUND otherwise)."""
        return self.container(container_id).process(exec_id)

    def connect_pid(self, container_id: str) -> int:
        """The task pid for Connect: 0 for an id this pod does not know (as runc)."""
        return self.task_pid if container_id in self._containers else 0

    @property
    def empty(self) -> bool:
        """No container exists or is being created."""
        return not self._containers and not self._reserved

    # containers
    async def create(self, c: ContainerConfig, paths: StdioPaths, open_io: IoOpener) -> int:
        """Create a container (booting the VM first if needed); return the task pid."""
        cid = validate_id("container", c.container_id)
        if cid in self._containers or cid in self._reserved:
            raise AlreadyExistsError(f"failed to create container {cid}: id already exists")
        self._reserved.add(cid)
        try:
            io = await open_io()
            try:
                await self._boot(c)
                await self.sandbox.create_container(c)
            except BaseException:
                await io.close()
                raise
            self._containers[cid] = self._new_container(c, paths, io)
            self._containers[cid].cpus = container_cpu_limit(c.spec)
            self._containers[cid].memory_bytes = container_memory_limit(c.spec)
        finally:
            self._reserved.discard(cid)
        await self._fit_vm()
        self._events.created(c, paths, self.task_pid)
        log.info("container created", extra=kv(container=cid, bundle=c.bundle))
        if not self._heap_released:
            # Once, after the boot: what start-up freed (configuration, QEMU's command line,
            # the first agent calls) goes back to the kernel, -0.8 MiB of the shim's PSS
            # (docs/performance.md "Levers"), instead of staying in glibc's heap.
            self._heap_released = True
            release_free_heap()
        return self.task_pid

    def _new_container(self, c: ContainerConfig, paths: StdioPaths, io: ProcessIO) -> Container:
        lock = asyncio.Lock()
        init = Process(self.sandbox.guest, c.container_id, "", paths, lock, self._on_exit, io)
        container = Container(c, init, lock)
        init.before_exit = container.wait_execs
        return container

    async def _boot(self, first: ContainerConfig) -> None:
        async with self._boot_lock:
            if self.sandbox.state is SandboxState.RUNNING:
                return
            await self.sandbox.start(sandbox_spec(first.spec))
            self.task_pid = self.sandbox.vmm_pid or os.getpid()
            log.info("sandbox started", extra=kv(
                hypervisor=self.sandbox.config.hypervisor.name,
                accelerator=self.sandbox.accelerator, vmm_pid=self.sandbox.vmm_pid,
                guest_kernel=self.sandbox.guest_kernel_release,
                boot_seconds=f"{self.sandbox.boot_seconds:.2f}"))  # fmt: skip

    async def start(self, container_id: str, exec_id: str) -> int:
        """Start the init or an exec; publish start / exec-started under the lock."""
        container = self.container(container_id)
        async with container.lock:
            process = container.process(exec_id)
            guest_pid = await process.start()
            if exec_id:
                self._events.exec_started(container_id, exec_id, self.task_pid)
            else:
                self._events.started(container_id, self.task_pid)
        log.info("process started", extra=kv(container=container_id, exec=exec_id,
                                             guest_pid=guest_pid))  # fmt: skip
        return self.task_pid

    def _on_exit(self, process: Process) -> None:
        if process.oom_killed:  # before the exit: CRI then reports the exit as OOMKilled
            self._events.oom(process.container_id)
        self._events.exited(process, self.task_pid)

    # cgroup of a container
    async def pause(self, container_id: str) -> None:
        """Freeze a running container (Pause)."""
        container = self.container(container_id)
        async with container.lock:
            await container.init.pause()
        self._events.paused(container_id)
        log.info("container paused", extra=kv(container=container_id))

    async def resume(self, container_id: str) -> None:
        """Thaw a paused container (Resume)."""
        container = self.container(container_id)
        async with container.lock:
            await container.init.resume()
        self._events.resumed(container_id)
        log.info("container resumed", extra=kv(container=container_id))

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI LinuxResources to a started container (Update)."""
        container = self.container(container_id)
        async with container.lock:
            if container.init.state not in LIVE:
                raise FailedPreconditionError(
                    f"failed to update container {container_id}: it is not running")
            await self.sandbox.guest.update_container(container_id, resources)
            container.cpus = cpu_limit(resources) or container.cpus
            container.memory_bytes = memory_limit(resources) or container.memory_bytes
        log.info("container resources updated", extra=kv(container=container_id))
        await self._fit_vm()

    async def _fit_vm(self) -> None:
        """Grow the VM to the pod's limits: the containers' sums, rounded up."""
        cpus = sum(c.cpus for c in self._containers.values())
        if cpus > 0:
            await self.sandbox.fit_vcpus(math.ceil(round(cpus, 6)))
        memory = sum(c.memory_bytes for c in self._containers.values())
        if memory > 0:
            await self.sandbox.fit_memory(-(-memory // (1 << 20)))

    def live_containers(self) -> list[str]:
        """Ids of the containers whose init process is running or paused."""
        return sorted(cid for cid, c in self._containers.items() if c.init.state in LIVE)

    async def stats(self, container_id: str) -> CgroupStats:
        """The container's cgroup figures (Stats)."""
        container = self.container(container_id)
        if container.init.state not in LIVE:
            raise FailedPreconditionError(
                f"failed to collect stats of container {container_id}: it is not running")
        return await self.sandbox.guest.stats_container(container_id)

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        """Signal a process (``all``: every process of the container)."""
        container = self.container(container_id)
        async with container.lock:
            await container.process(exec_id).kill(signal, all)

    async def exec(self, e: ExecConfig, paths: StdioPaths, open_io: IoOpener) -> None:
        """Register an exec process (started later by `start`)."""
        container = self.container(e.container_id)
        validate_id("exec", e.exec_id)
        async with container.lock:
            if e.exec_id in container.execs:
                raise AlreadyExistsError(f"failed to add exec {e.exec_id}: id already exists")
            if container.init.state is not State.RUNNING:
                raise FailedPreconditionError(
                    f"failed to add exec {e.exec_id}: container {e.container_id} is not running"
                )
            if self.sandbox.state is not SandboxState.RUNNING:
                raise UnavailableError(f"failed to add exec {e.exec_id}: the VM is not running")
            io = await open_io()
            container.execs[e.exec_id] = Process(
                self.sandbox.guest, e.container_id, e.exec_id, paths, container.lock,
                self._on_exit, io, exec_config=e,
            )
            self._events.exec_added(e.container_id, e.exec_id)

    async def delete(self, container_id: str, exec_id: str) -> Process:
        """Delete a stopped (or never started) process; the init takes its container along."""
        container = self.container(container_id)
        in_guest = True
        async with container.lock:
            process = container.process(exec_id)
            process.ensure(Op.DELETE)
            if exec_id:
                started = process.state is not State.CREATED
                await process.delete()
                del container.execs[exec_id]
                if started:  # the guest knows it only once started
                    await self._forget(functools.partial(self.sandbox.guest.remove_process,
                                                         container_id), exec_id)  # fmt: skip
            else:
                # The pod's last container (or its sandbox container): the VM stops next,
                # and the guest's copy of the container goes with it (DestroySandbox kills
                # what is left, the stop unmounts the share). A RemoveContainer now would
                # only make the guest run `crun delete` (~0.15 s under TCG) for nothing.
                in_guest = not self._ends_with(container_id)
                await self._delete_container(container, in_guest)
                self._events.deleted(process, self.task_pid)  # for the init only, as runc
        log.info("process deleted", extra=kv(container=container_id, exec=exec_id))
        if not exec_id and (self.empty or container_id == self.sandbox.id):
            await self.stop_sandbox()
        elif not exec_id and not in_guest:  # a Create came in meanwhile: the VM stays
            await self._forget(self.sandbox.remove_container, container_id)
        return process

    def _ends_with(self, container_id: str) -> bool:
        """Whether deleting this container's init stops the sandbox."""
        others = self._containers.keys() - {container_id}
        return container_id == self.sandbox.id or not (others or self._reserved)

    async def _delete_container(self, container: Container, in_guest: bool = True) -> None:
        cid = container.config.container_id
        if in_guest:
            await self._forget(self.sandbox.remove_container, cid)
        for process in [*container.execs.values(), container.init]:
            await process.delete(force=True)
        del self._containers[cid]

    @staticmethod
    async def _forget(remove: Callable[[str], Awaitable[None]], ident: str) -> None:
        """Remove a container's share or an exec in the guest; a VM that is gone or forgot
        the id is no error."""
        try:
            await remove(ident)
        except (UnavailableError, NotFoundError) as e:
            log.info("nothing to remove: %s", e, extra=kv(id=ident))

    async def pids(self, container_id: str) -> list[int]:
        """Guest pids of a container's processes."""
        self.container(container_id)
        return await self.sandbox.guest.list_pids(container_id)

    async def resize(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        """Resize a process's pty."""
        container = self.container(container_id)
        async with container.lock:
            await container.process(exec_id).resize(width, height)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        """Close a process's stdin after what is buffered has been forwarded."""
        container = self.container(container_id)
        async with container.lock:
            container.process(exec_id).close_stdin()

    # whole pod
    async def stop_sandbox(self) -> None:
        """Stop the VM (idempotent); processes still running exit with 255. A stop already
        under way (the VM died, the agent broke the channel) is waited for: the daemon
        must not exit halfway through its teardown."""
        async with self._boot_lock:
            if self.sandbox.state in (SandboxState.RUNNING, SandboxState.STOPPING):
                await self.sandbox.stop()
                log.info("sandbox stopped")

    async def shutdown(self) -> bool:
        """Shutdown: stop the VM and return True if no container is left, else False."""
        if not self.empty:
            return False
        await self.stop_sandbox()
        return True

    async def terminate(self) -> None:
        """SIGTERM: stop the VM, then give exit watchers time to publish the exits."""
        waits = [p.wait() for c in self._containers.values()
                 for p in (c.init, *c.execs.values()) if p.state in LIVE]  # fmt: skip
        await self.stop_sandbox()
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), TERMINATE_GRACE)


def exec_config(container_id: str, exec_id: str, process: dict[str, Any], paths: StdioPaths
                ) -> ExecConfig:  # fmt: skip
    """The `ExecConfig` of an Exec request."""
    return ExecConfig(container_id, exec_id, process, paths.terminal, bool(paths.stdin))
