"""`Qemu`: one QEMU VM (plus its virtiofsd) as a child of the shim. The facade of this package.

Theory of operation: `Qemu.start` runs these steps, each registering its undo on an
`contextlib.AsyncExitStack`, so a failure at any step unwinds the ones before it and leaves
no process or socket behind:

1. create the state directory (undo: remove the sockets and pid file; logs stay);
2. choose the accelerator (`hypervisors.accel`) and log the reason;
3. for virtio-fs, start virtiofsd and wait for its socket (undo: stop it);
3b. listen for the guest console (`hypervisors.console`: a size-capped console.log);
4. spawn QEMU with stderr to ``<state>/qemu.stderr`` and PR_SET_PDEATHSIG (undo: SIGKILL and
   wait);
5. connect QMP, racing QEMU's exit: a QEMU that dies during start-up (bad kernel path, ...)
   becomes a `HypervisorError` quoting the tail of qemu.stderr (undo: close QMP).

On success the stack is kept; `Qemu.stop` first asks QEMU to ``quit`` over QMP and waits,
then unwinds the stack (SIGKILL if QEMU is still there, virtiofsd stopped, sockets removed).
`stop` is idempotent and safe after QEMU died on its own. Nothing here blocks the event
loop: waits are asyncio waits with deadlines from `hypervisors.timeouts`.

Concurrency: ``_lock`` serialises `start` and `stop`; other members are read-only views.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from pathlib import Path

from hypervisors.accel import AccelChoice, Accelerator, choose_accelerator
from hypervisors.config import QemuConfig
from hypervisors.console import ConsoleLog
from hypervisors.errors import HypervisorError, QmpError
from hypervisors.procs import ProcessRecord, kill_recorded, record, spawn, wait_process
from hypervisors.qemu_args import (
    AGENT_VSOCK_PORT,
    AgentChannel,
    StatePaths,
    VmParams,
    build_argv,
)
from hypervisors.qmp import QmpClient
from hypervisors.timeouts import TIMEOUTS
from hypervisors.virtiofsd import Virtiofsd, tail

log = logging.getLogger(__name__)

__all__ = ["Qemu", "kill_recorded"]

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"


def default_agent_channel() -> AgentChannel:
    """vsock where the host has vhost-vsock, else virtio-serial."""
    return AgentChannel.VSOCK if os.path.exists(VHOST_VSOCK_DEVICE) else AgentChannel.SERIAL


class Qemu:
    """One VM for one sandbox."""

    def __init__(
        self, config: QemuConfig, sandbox_id: str, state_dir: Path, shared_dir: Path | None,
        *, agent_channel: AgentChannel | None = None, guest_cid: int | None = None,
        extra_kernel_params: tuple[str, ...] = (),
    ) -> None:
        """Describe the VM; nothing runs until `start`."""
        if config.shared_fs != "none" and shared_dir is None:
            raise HypervisorError(
                f"failed to configure VM {sandbox_id}: shared_fs is {config.shared_fs} "
                "but no shared directory was given"
            )
        self.config = config
        self.sandbox_id = sandbox_id
        self.paths = StatePaths(state_dir)
        self.shared_dir = shared_dir
        self._channel = agent_channel or default_agent_channel()
        if self._channel is AgentChannel.VSOCK and guest_cid is None:
            guest_cid = random.randint(3, 2**31 - 1)  # a collision fails QEMU start loudly
        self._guest_cid = guest_cid
        self._extra_kernel_params = extra_kernel_params
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._accel: AccelChoice | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._virtiofsd: Virtiofsd | None = None
        self._qmp: QmpClient | None = None
        self._records: list[ProcessRecord] = []

    # -- views ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """QEMU's pid once spawned."""
        return self._proc.pid if self._proc else None

    @property
    def virtiofsd_pid(self) -> int | None:
        """virtiofsd's pid once spawned (virtio-fs only)."""
        return self._virtiofsd.pid if self._virtiofsd else None

    @property
    def accelerator(self) -> Accelerator | None:
        """"kvm" or "tcg" once `start` chose it."""
        return self._accel.accelerator if self._accel else None

    @property
    def accelerator_reason(self) -> str:
        """Why that accelerator was chosen."""
        return self._accel.reason if self._accel else ""

    @property
    def agent_socket(self) -> Path:
        """Host end of the virtio-serial agent channel."""
        return self.paths.agent_socket

    @property
    def agent_address(self) -> str:
        """``serial:///<state>/agent.sock`` or ``vsock://<cid>:1024``."""
        if self._channel is AgentChannel.VSOCK:
            return f"vsock://{self._guest_cid}:{AGENT_VSOCK_PORT}"
        return f"serial://{self.paths.agent_socket}"

    @property
    def console_log(self) -> Path:
        """The guest serial console, kept after stop."""
        return self.paths.console_log

    @property
    def qmp(self) -> QmpClient:
        """The QMP client of a started VM."""
        if self._qmp is None:
            raise HypervisorError(f"failed to use QMP of VM {self.sandbox_id}: not started")
        return self._qmp

    def process_records(self) -> list[ProcessRecord]:
        """(pid, start_time, role) of the helpers a started VM runs; persist them for cleanup."""
        return list(self._records)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start virtiofsd (if needed) and QEMU, and connect QMP; undo everything on failure."""
        async with self._lock:
            if self._stack is not None or self._proc is not None:
                raise HypervisorError(f"failed to start VM {self.sandbox_id}: already started")
            async with contextlib.AsyncExitStack() as stack:
                self.paths.state_dir.mkdir(parents=True, exist_ok=True)
                stack.callback(self._remove_files)
                self._remove_files()
                self._accel = choose_accelerator(self.config.accelerator)
                log.info("VM %s: accelerator %s", self.sandbox_id, self._accel.reason)
                if self.config.shared_fs == "virtio-fs":
                    await self._start_virtiofsd(stack)
                console = ConsoleLog(self.paths.console_socket, self.paths.console_log)
                await console.start()
                stack.push_async_callback(console.stop)  # after QEMU is gone (LIFO)
                await self._spawn_qemu(stack)
                self._qmp = await self._connect_qmp()
                stack.push_async_callback(self._close_qmp)
                self._stack = stack.pop_all()

    async def _start_virtiofsd(self, stack: contextlib.AsyncExitStack) -> None:
        assert self.shared_dir is not None
        vfs = Virtiofsd(
            self.config.virtio_fs_daemon, self.paths.virtiofsd_socket, self.shared_dir,
            self.config.virtio_fs_cache, self.config.virtio_fs_extra_args,
            self.paths.virtiofsd_stderr,
        )
        self._virtiofsd = vfs
        stack.push_async_callback(vfs.stop)
        await vfs.start()
        self._add_record(vfs.pid, "virtiofsd")

    async def _spawn_qemu(self, stack: contextlib.AsyncExitStack) -> None:
        assert self._accel is not None
        vm = VmParams(
            sandbox_id=self.sandbox_id, paths=self.paths, accelerator=self._accel.accelerator,
            agent_channel=self._channel, guest_cid=self._guest_cid,
            shared_dir=self.shared_dir, extra_kernel_params=self._extra_kernel_params,
        )
        argv = build_argv(self.config, vm)
        log.debug("VM %s: %s", self.sandbox_id, " ".join(argv))
        try:
            self._proc = await spawn(argv, self.paths.qemu_stderr)
        except OSError as exc:
            raise HypervisorError(f"failed to start QEMU {argv[0]}: {exc}") from exc
        stack.push_async_callback(self._kill_qemu)
        self._add_record(self._proc.pid, "qemu")

    def _add_record(self, pid: int | None, role: str) -> None:
        rec = record(pid, role) if pid is not None else None
        if rec is not None:
            self._records.append(rec)

    async def _connect_qmp(self) -> QmpClient:
        """Connect QMP unless QEMU exits first."""
        assert self._proc is not None
        connect = asyncio.create_task(QmpClient.connect(self.paths.qmp_socket))
        exited = asyncio.create_task(self._proc.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connect, exited):
                task.cancel()
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            return connect.result()
        if connect.done() and not connect.cancelled():
            connect.exception()  # retrieved: reported through the error below
        code = await wait_process(self._proc, 0.5)
        if code is None:
            raise HypervisorError(
                f"failed to start QEMU for {self.sandbox_id}: {connect.exception()}; "
                f"stderr:\n{tail(self.paths.qemu_stderr)}"
            )
        raise HypervisorError(
            f"failed to start QEMU for {self.sandbox_id}: exited with code {code}; "
            f"stderr:\n{tail(self.paths.qemu_stderr)}"
        )

    async def wait_exited(self) -> int:
        """Wait (no deadline: this is a long poll) until QEMU exits; its return code."""
        if self._proc is None:
            raise HypervisorError(f"failed to wait for VM {self.sandbox_id}: not started")
        return await self._proc.wait()

    async def stop(self, timeout: float = TIMEOUTS.qemu_quit) -> None:
        """Quit QEMU (SIGKILL after ``timeout``), stop virtiofsd, remove sockets. Idempotent."""
        async with self._lock:
            stack, self._stack = self._stack, None
            if stack is None:
                return
            try:
                await self._quit(timeout)
            finally:
                await stack.aclose()
                self._records.clear()

    async def _quit(self, timeout: float) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        if self._qmp is not None and not self._qmp.closed:
            try:
                await self._qmp.quit(timeout=timeout)
            except (QmpError, TimeoutError) as exc:
                log.warning("VM %s: QMP quit failed: %s", self.sandbox_id, exc)
        if await wait_process(self._proc, timeout) is None:
            log.warning("VM %s: QEMU still running %gs after quit", self.sandbox_id, timeout)

    async def _kill_qemu(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        code = await wait_process(proc, TIMEOUTS.kill_wait)
        log.info("VM %s: QEMU pid %d exited with %s", self.sandbox_id, proc.pid, code)

    async def _close_qmp(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()

    def _remove_files(self) -> None:
        for path in (*self.paths.sockets(), self.paths.qemu_pidfile):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
