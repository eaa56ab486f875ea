"""One pod: a VM, the agent inside it, the shared rootfs storage and the state on disk.

Theory of operation: ``start`` builds the sandbox step by step on an AsyncExitStack (state
dir, shared mount, VM, agent connection, CreateSandbox); each step registers its undo right
away, so a failure at any step unwinds everything already done and ``stop`` is that same
unwinding. Container and process calls are forwarded to the agent; agent errors are turned
into the runtime's error hierarchy (same status code, a ``failed to <verb>`` message).
What a crashed shim's ``delete`` needs is written to ``state.json`` as soon as it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

from agent_client import AgentCallError, AgentClient, GuestDetails, StorageSpec, bounded
from hypervisors.config import ConfigError
from hypervisors.errors import HypervisorError
from hypervisors.procs import ProcessRecord as VmProcessRecord
from hypervisors.procs import is_alive, start_time
from hypervisors.qemu import Qemu
from sandbox import storage
from sandbox.cleanup import cleanup_after_crash
from sandbox.config import RuntimeConfig
from sandbox.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    SandboxError,
    UnavailableError,
)
from sandbox.oci import GUEST_SHARED_DIR, SHARED_FS_TAG, SharedBind, spec_for_guest
from sandbox.state import (
    ProcessRecord,
    SandboxRecord,
    read_record,
    sandbox_path,
    write_record,
)
from sandbox.types import ContainerConfig, ExecConfig, validate_id
from ttrpc import Code

log = logging.getLogger(__name__)

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
async def _agent_errors(what: str) -> AsyncIterator[None]:
    """Turn an agent's ttrpc error into the runtime's hierarchy, keeping its code."""
    try:
        yield
    except AgentCallError as e:  # its message is already bounded (untrusted guest text)
        kind = _ERRORS_BY_CODE.get(e.code, SandboxError)
        raise kind(f"failed to {what}: {e.message or e.code.name}") from e


def shared_storage(shared_fs: str) -> StorageSpec:
    """How the guest mounts the share, for the configured ``shared_fs``."""
    if shared_fs == "virtio-fs":
        return StorageSpec("virtio-fs", SHARED_FS_TAG, "virtiofs", GUEST_SHARED_DIR)
    if shared_fs == "virtio-9p":
        return StorageSpec("9p", SHARED_FS_TAG, "9p", GUEST_SHARED_DIR)
    raise InvalidArgumentError(
        f"hypervisor.qemu.shared_fs = {shared_fs!r} cannot carry container rootfs: "
        "use \"virtio-fs\" (or \"virtio-9p\" with a guest kernel that has 9p)"
    )


class Sandbox:
    """A running pod VM and its containers (see the module docstring)."""

    def __init__(self, sandbox_id: str, config: RuntimeConfig) -> None:
        self.id = validate_id("sandbox", sandbox_id)
        self.config = config
        self.state_path = sandbox_path(config.state_dir, self.id)
        self.shared_dir = self.state_path / "shared"
        self.guest: GuestDetails | None = None
        self.boot_seconds = 0.0
        self._vm: Qemu | None = None
        self._agent: AgentClient | None = None
        self._undo: AsyncExitStack | None = None
        self._record = SandboxRecord(
            sandbox_id=self.id, shim_pid=os.getpid(), shim_start_time=start_time(os.getpid()) or 0
        )
        self._containers: set[str] = set()
        self._execs: dict[tuple[str, str], ExecConfig] = {}

    # evidence for logs and the demo
    @property
    def qemu_pid(self) -> int | None:
        """Pid of the QEMU process, while it runs."""
        return self._vm.pid if self._vm else None

    @property
    def accelerator(self) -> str:
        """kvm or tcg."""
        accel = self._vm.accelerator if self._vm else None
        return str(accel) if accel else ""

    @property
    def accelerator_reason(self) -> str:
        """Why that accelerator was chosen."""
        return self._vm.accelerator_reason if self._vm else ""

    @property
    def guest_kernel_release(self) -> str:
        """``uname -r`` inside the guest."""
        return self.guest.kernel_release if self.guest else ""

    @property
    def console_log(self) -> Path:
        """The guest console, saved in the state dir."""
        return self.state_path / "console.log"

    # lifecycle
    async def start(self, hostname: str = "") -> None:
        """Boot the VM and prepare the agent; on failure leave nothing behind."""
        if self._undo is not None:
            raise FailedPreconditionError(f"sandbox {self.id} is already started")
        try:
            self.config.qemu.check_files(str(self.config.path))
        except ConfigError as e:
            raise InvalidArgumentError(f"failed to start sandbox {self.id}: {e}") from e
        shared_storage(self.config.qemu.shared_fs)  # refuse a share we cannot use, early
        try:
            await self._start(hostname)
        except (OSError, HypervisorError) as e:
            # Everything was undone; say what failed with a status containerd understands.
            raise UnavailableError(f"failed to start sandbox {self.id}: {e}") from e

    async def _start(self, hostname: str) -> None:
        started = time.monotonic()
        async with AsyncExitStack() as stack:
            await self._make_state_dir(stack)
            vm = await self._start_vm(stack)
            agent = await self._connect_agent(vm, stack)
            async with _agent_errors("get guest details"):
                self.guest = await agent.guest_details()
            log.info(
                "agent ready: started in %.2fs, serving at guest uptime %.2fs, %.2fs after "
                "the sandbox start began", self.guest.agent_init_seconds,
                self.guest.agent_startup_seconds, time.monotonic() - started,
            )
            storages = [shared_storage(self.config.qemu.shared_fs)]
            async with _agent_errors("create the sandbox in the guest"):
                await agent.create_sandbox(self.id, hostname or self.id[:63], storages)
            self._record.guest_kernel_release = self.guest.kernel_release
            self._save()
            self._undo = stack.pop_all()
        self.boot_seconds = time.monotonic() - started

    async def _make_state_dir(self, stack: AsyncExitStack) -> None:
        if self.state_path.exists():
            await asyncio.to_thread(self._clear_stale_state)
        self.state_path.mkdir(mode=0o700, parents=True)
        # umount can block on a sync: keep it off the event loop.
        stack.push_async_callback(asyncio.to_thread, storage.remove_tree, self.state_path)
        stack.push_async_callback(asyncio.to_thread, storage.unmount_tree, self.state_path)
        await asyncio.to_thread(storage.prepare_shared_dir, self.shared_dir)
        self._save()

    def _clear_stale_state(self) -> None:
        """A state dir for our id: refuse if its shim lives, else clean up what it left."""
        record = read_record(self.state_path)
        if record is not None and is_alive(
            VmProcessRecord(record.shim_pid, record.shim_start_time, "shim")
        ):
            raise AlreadyExistsError(
                f"failed to create sandbox {self.id}: shim pid {record.shim_pid} still runs it"
            )
        log.warning("sandbox %s: cleaning up what a dead shim left in %s", self.id,
                    self.state_path)
        cleanup_after_crash(self.config.state_dir, self.id)

    async def _start_vm(self, stack: AsyncExitStack) -> Qemu:
        vm = Qemu(self.config.qemu, self.id, self.state_path, self.shared_dir)
        stack.push_async_callback(vm.stop)
        self._vm = vm
        stack.callback(setattr, self, "_vm", None)
        try:
            await vm.start()
        except HypervisorError as e:
            raise UnavailableError(f"failed to start the VM of sandbox {self.id}: {e}") from e
        self._record.accelerator = self.accelerator
        self._record.accelerator_reason = vm.accelerator_reason
        self._record.processes = [
            ProcessRecord(pid=r.pid, start_time=r.start_time, role=r.role)
            for r in vm.process_records()
        ]
        self._save()
        log.info(
            "vm started sandbox=%s qemu_pid=%s accelerator=%s reason=%r",
            self.id, vm.pid, vm.accelerator, vm.accelerator_reason,
        )
        return vm

    async def _connect_agent(self, vm: Qemu, stack: AsyncExitStack) -> AgentClient:
        timeout = self.config.agent.dial_timeout
        connect = asyncio.ensure_future(AgentClient.connect(vm.agent_address, timeout))
        died = asyncio.ensure_future(vm.wait_exited())
        try:
            await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            died.cancel()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise UnavailableError(
                f"failed to connect to the agent of sandbox {self.id}: the VM exited while "
                f"booting; see {self.console_log}{self._console_tail()}"
            )
        try:
            agent = connect.result()
        except (TimeoutError, AgentCallError, OSError) as e:
            raise UnavailableError(
                f"failed to connect to the agent of sandbox {self.id} within {timeout:.0f}s "
                f"({bounded(str(e))}); see {self.console_log}{self._console_tail()}"
            ) from e
        stack.push_async_callback(agent.close)
        self._agent = agent
        stack.callback(setattr, self, "_agent", None)
        return agent

    def _console_tail(self, lines: int = 5) -> str:
        try:
            text = self.console_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        # Guest output: untrusted, so bounded like any other guest text.
        return (": ..." + bounded(" | ".join(text[-lines:]), 1024)) if text else ""

    def _save(self) -> None:
        self._record.containers = sorted(self._containers)
        write_record(self.state_path, self._record)

    async def stop(self) -> None:
        """Stop everything (idempotent): containers, agent, VM, mounts, state dir."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        if self._agent is not None:
            with contextlib.suppress(AgentCallError, OSError, asyncio.TimeoutError):
                await self._agent.destroy_sandbox()
        self._containers.clear()
        self._execs.clear()
        try:
            await undo.aclose()
        except (OSError, HypervisorError) as e:
            raise UnavailableError(f"failed to stop sandbox {self.id} cleanly: {e}") from e

    def _agent_or_raise(self) -> AgentClient:
        if self._agent is None:
            raise UnavailableError(f"sandbox {self.id} is not running")
        return self._agent

    # containers
    def _container_rootfs(self, container_id: str) -> Path:
        return self.shared_dir / "containers" / container_id / "rootfs"

    def _known(self, container_id: str) -> None:
        if container_id not in self._containers:
            raise NotFoundError(f"container {container_id} not found in sandbox {self.id}")

    async def create_container(self, c: ContainerConfig) -> None:
        """Mount the rootfs into the share and create the container in the guest."""
        cid = validate_id("container", c.container_id)
        agent = self._agent_or_raise()
        if cid in self._containers:
            raise AlreadyExistsError(f"container {cid} already exists in sandbox {self.id}")
        rootfs = self._container_rootfs(cid)
        spec, binds = spec_for_guest(c.spec, cid)
        await asyncio.to_thread(self._mount_rootfs, c, rootfs, binds)
        self._containers.add(cid)
        self._save()
        try:
            async with _agent_errors(f"create container {cid}"):
                await agent.create_container(cid, spec, c.terminal, c.stdin)
        except BaseException:
            await self._forget_container(cid)
            raise

    def _mount_rootfs(self, c: ContainerConfig, rootfs: Path, binds: list[SharedBind]) -> None:
        """The rootfs and the bind-mount sources, under the container's share (or nothing)."""
        what = "the rootfs"
        try:
            if c.rootfs:
                storage.mount_rootfs(c.rootfs, rootfs)
            else:
                root = c.spec.get("root", {}).get("path", "rootfs")
                source = Path(root) if Path(root).is_absolute() else c.bundle / root
                storage.bind_dir(source, rootfs)
            for bind in binds:
                what = f"bind mount source {bind.source}"
                storage.bind_path(Path(bind.source), rootfs.parent / "mounts" / bind.name,
                                  bind.readonly)
        except OSError as e:
            storage.unmount_tree(rootfs.parent)
            storage.remove_tree(rootfs.parent)
            raise InvalidArgumentError(
                f"failed to share {what} of container {c.container_id}: {e}"
            ) from e

    async def _forget_container(self, container_id: str) -> None:
        directory = self._container_rootfs(container_id).parent
        await asyncio.to_thread(storage.unmount_tree, directory)
        await asyncio.to_thread(storage.remove_tree, directory)
        self._containers.discard(container_id)
        for key in [k for k in self._execs if k[0] == container_id]:
            del self._execs[key]
        self._save()

    async def remove_container(self, container_id: str) -> None:
        """Stop what is left of the container in the guest and unmount its rootfs."""
        self._known(container_id)
        agent = self._agent_or_raise()
        try:
            async with _agent_errors(f"remove container {container_id}"):
                await agent.remove_container(container_id)
        except NotFoundError:
            pass  # the guest never had it or already forgot it
        finally:
            await self._forget_container(container_id)

    # processes
    def add_exec(self, e: ExecConfig) -> None:
        """Remember an exec; the guest sees it when it is started."""
        self._known(e.container_id)
        validate_id("exec", e.exec_id)
        key = (e.container_id, e.exec_id)
        if key in self._execs:
            raise AlreadyExistsError(f"exec {e.exec_id} already exists in {e.container_id}")
        self._execs[key] = e

    async def start_process(self, container_id: str, exec_id: str) -> int:
        """Start the init process ("") or an exec; return its guest pid."""
        self._known(container_id)
        agent = self._agent_or_raise()
        if not exec_id:
            async with _agent_errors(f"start container {container_id}"):
                return await agent.start_container(container_id)
        e = self._exec(container_id, exec_id)
        async with _agent_errors(f"start exec {exec_id} in {container_id}"):
            return await agent.exec_process(container_id, exec_id, e.process, e.stdin)

    def _exec(self, container_id: str, exec_id: str) -> ExecConfig:
        try:
            return self._execs[(container_id, exec_id)]
        except KeyError:
            raise NotFoundError(f"exec {exec_id} not found in {container_id}") from None

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        """Forget an exec that has exited."""
        self._exec(container_id, exec_id)
        del self._execs[(container_id, exec_id)]

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """Wait for the process to exit; its status (code, or 128+signal)."""
        async with _agent_errors(f"wait for {container_id}/{exec_id or 'init'}"):
            return await self._agent_or_raise().wait_process(container_id, exec_id)

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all: bool = False
    ) -> None:
        """Send a signal to a process (or, with ``all``, to every process of the container)."""
        async with _agent_errors(f"signal {container_id}/{exec_id or 'init'}"):
            await self._agent_or_raise().signal_process(container_id, exec_id, signal, all)

    async def list_pids(self, container_id: str) -> list[int]:
        """Guest pids of the container's processes."""
        self._known(container_id)
        async with _agent_errors(f"list the processes of {container_id}"):
            return await self._agent_or_raise().list_processes(container_id)

    # stdio
    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        """Next stdout bytes (long poll); b"" at end of stream."""
        async with _agent_errors(f"read stdout of {container_id}/{exec_id or 'init'}"):
            return await self._agent_or_raise().read_stdout(container_id, exec_id)

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        """Next stderr bytes (long poll); b"" at end of stream."""
        async with _agent_errors(f"read stderr of {container_id}/{exec_id or 'init'}"):
            return await self._agent_or_raise().read_stderr(container_id, exec_id)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """Write to the process's stdin."""
        async with _agent_errors(f"write stdin of {container_id}/{exec_id or 'init'}"):
            return await self._agent_or_raise().write_stdin(container_id, exec_id, data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        """Close the process's stdin."""
        async with _agent_errors(f"close stdin of {container_id}/{exec_id or 'init'}"):
            await self._agent_or_raise().close_stdin(container_id, exec_id)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        """Set the terminal size of the process."""
        async with _agent_errors(f"resize the pty of {container_id}/{exec_id or 'init'}"):
            await self._agent_or_raise().tty_win_resize(container_id, exec_id, height, width)
