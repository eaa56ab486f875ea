"""`VmmVm`: the lifecycle every VMM driver shares (QEMU's `Qemu`, StratoVirt's `Stratovirt`).

Theory of operation: a driver subclasses `VmmVm` and supplies what differs between VMMs:
its command line (`build_argv`), the accelerator decision (`_choose_accelerator`), its QMP
dialect (`qmp_dialect`), how the guest console reaches us (`_console_before_spawn` /
`_console_after_spawn`), hot-plug (`_hotplug`) and resizing. `VmmVm.start` runs these steps,
each registering its undo on an `contextlib.AsyncExitStack`, so a failure at any step
unwinds the ones before it and leaves no process or socket behind:

1. create the state directory (undo: remove the sockets and pid file; logs stay);
2. choose the accelerator and log the reason (a driver may refuse here, before spawning);
3. for a virtio-fs share, start virtiofsd and wait for its socket (undo: stop it);
4. the guest console (`hypervisors.console`: a size-capped console.log);
5. spawn the VMM behind the parent-death wrapper, its stderr copied into a size-capped
   ``<state>/vmm.stderr`` and the cold-plugged devices' fds inherited (undo: SIGKILL and
   wait);
6. connect QMP, racing the VMM's exit: a VMM that dies during start-up (bad kernel path, ...)
   becomes a `HypervisorError` quoting the tail of vmm.stderr (undo: close QMP).

On success the stack is kept; `VmmVm.stop` first asks the VMM to ``quit`` over QMP and waits,
then unwinds the stack (SIGKILL if the VMM is still there, virtiofsd stopped, sockets
removed). `stop` is idempotent and safe after the VMM died on its own. Nothing here blocks
the event loop: waits are asyncio waits with deadlines from `hypervisors.timeouts`.

If virtiofsd dies under a running VM, the VMM is killed: the guest could no longer reach its
containers' files, and the sandbox learns of a dead VM through `wait_exited`.

Devices added before `start` are cold-plugged (on the command line); after it, `add_device`
hands them to the driver's `_hotplug`.

Concurrency: ``_lock`` serialises `start`, `stop`, hot-plug and resizes; other members are
views.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from common.constants import AGENT_VSOCK_PORT
from hostos.adopted import AdoptedProcess
from hostos.procs import (
    ProcessRecord,
    record,
    set_cpu_bound,
    signal_child,
    spawn,
    wait_process,
)
from hostos.slots import give_back, host_cpus, try_take
from hypervisors.accel import AccelChoice
from hypervisors.base import Device, DeviceList, SharedFsDevice, VmSpec, VsockDevice
from hypervisors.console import ConsoleLog, StderrLog
from hypervisors.errors import HypervisorError, HypervisorUnsupported, QmpError
from hypervisors.held import HeldVmm
from hypervisors.qmp import QEMU_DIALECT, QmpClient, QmpDialect
from hypervisors.statepaths import StatePaths
from hypervisors.timeouts import TIMEOUTS
from hypervisors.virtiofsd import Virtiofsd, tail
from hypervisors.vsock.process import VsockBackend

log = logging.getLogger(__name__)

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"


def host_has_vhost_vsock() -> bool:
    """Whether this host can give a VM a vhost-vsock device."""
    return os.path.exists(VHOST_VSOCK_DEVICE)


class VmmConfig(Protocol):
    """What the shared lifecycle reads of a driver's configuration."""

    @property
    def virtio_fs_daemon(self) -> str:
        """virtiofsd's path."""

    @property
    def virtio_fs_cache(self) -> str:
        """virtiofsd's cache mode."""

    @property
    def virtio_fs_extra_args(self) -> tuple[str, ...]:
        """More virtiofsd arguments."""


C = TypeVar("C", bound=VmmConfig)


class VmmVm(abc.ABC, Generic[C]):
    """One VM for one sandbox (a `hypervisors.base.Hypervisor` once a driver completes it)."""

    #: The VMM's name in messages ("QEMU", "StratoVirt").
    vmm_name: ClassVar[str] = "VMM"
    #: How its QMP differs from QEMU's.
    qmp_dialect: ClassVar[QmpDialect] = QEMU_DIALECT

    def __init__(self, config: C, vm: VmSpec) -> None:
        """Describe the VM; nothing runs until `start`."""
        self.config = config
        self.spec = vm
        self.sandbox_id = vm.sandbox_id
        self.paths = StatePaths(vm.state_dir, vm.socket_dir)
        self._devices = DeviceList()
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._accel: AccelChoice | None = None
        self._proc: asyncio.subprocess.Process | AdoptedProcess | None = None
        self._console: ConsoleLog | None = None
        self._held: HeldVmm | None = None  # the VMM under a holder (`_spawn_held`)
        self._released = False  # another process runs the VM now (`release_for_adoption`)
        self._virtiofsd: Virtiofsd | None = None
        self._vsock_backend: VsockBackend | None = None
        self._qmp: QmpClient | None = None
        self._stderr: StderrLog | None = None
        self._stopping = False  # set by stop(): helpers exiting then are expected
        self._batch = False  # spawned under SCHED_BATCH, until `booted`
        self._boot_slot: int | None = None  # a host-wide boot slot held, until `booted`
        self._records: list[ProcessRecord] = []

    # -- what a driver supplies ----------------------------------------------------------

    @abc.abstractmethod
    def build_argv(self) -> list[str]:
        """The VMM's full command line (binary first), from the devices added so far."""

    @abc.abstractmethod
    def _choose_accelerator(self) -> AccelChoice:
        """The accelerator, or a `HypervisorError` saying why this VM cannot run here."""

    @abc.abstractmethod
    async def resize_vcpus(self, count: int) -> int:
        """Make the VM have ``count`` vCPUs; the count it has afterwards."""

    @abc.abstractmethod
    async def resize_memory(self, mib: int) -> int:
        """Make the VM have ``mib`` MiB of RAM; the size it has afterwards."""

    async def _hotplug(self, device: Device) -> None:
        """Plug ``device`` into the running VM (called under ``_lock``)."""
        raise HypervisorUnsupported(
            f"failed to add {type(device).__name__} to running VM {self.sandbox_id}: "
            f"{self.vmm_name} hot-plug is not supported by this version")

    def _prepare(self) -> None:
        """The driver's last decisions before anything is spawned (accelerator chosen)."""

    async def _before_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        """What the driver prepares for the VMM's spawn (undone through ``stack``)."""

    async def _after_connect(self) -> None:
        """What the driver does once QMP answers, before the VM counts as started."""

    def _spawn_fds(self) -> tuple[int, ...]:
        """The fds the VMM inherits: the cold-plugged devices'."""
        return self._devices.fds()

    def _forget_failed_start(self) -> None:
        """After a `start` that failed (and undid everything): as if never started."""
        self._proc = self._virtiofsd = self._qmp = self._stderr = None
        self._vsock_backend = self._console = self._held = None
        self._released = False
        self._records.clear()

    def _vmm_env(self) -> Mapping[str, str] | None:
        """Environment variables the VMM gets besides PATH."""
        return None

    async def _console_before_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        """Default: we listen, the VMM's serial chardev connects at start-up."""
        console = ConsoleLog(self.paths.console_socket, self.paths.console_log)
        await console.start()
        self._console = console
        stack.push_async_callback(console.stop)  # after the VMM is gone (LIFO)

    async def _console_after_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        """For VMMs that listen on the console socket themselves."""

    # -- views ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The VMM's pid once spawned."""
        return self._proc.pid if self._proc else None

    @property
    def from_template(self) -> bool:
        """Whether the VM was restored from a template (only a driver that has them)."""
        return False

    def booted(self) -> None:
        """A VMM spawned as a batch job for its boot (under TCG: `_spawn_vmm`) goes back to
        normal scheduling now that its guest serves: the boot, CPU-bound, gained from it
        (pods starting at once), while a pod's round trips would wait behind CPU-bound
        neighbours (`exec` p90 +20 % beside two busy pods, docs/performance.md)."""
        if self._batch and self._proc is not None and self._proc.returncode is None:
            set_cpu_bound(self._proc.pid, False)
        self._batch = False
        self._give_back_boot_slot()

    def _restores(self) -> bool:
        """Whether `start` restores a saved VM rather than booting one (a driver's)."""
        return False

    async def _take_boot_slot(self, stack: contextlib.AsyncExitStack) -> None:
        """Under TCG, a cold boot first waits for a host-wide boot slot (`VmSpec.boot_slots`,
        one per host CPU), held until `booted`: guests booting at once then each have a
        core instead of sharing them all, and the first ones serve sooner (8 pods on 2
        cores, docs/performance.md "Levers"). Bounded: after `Timeouts.boot_slot` the VM
        boots anyway, and a slot that cannot be taken at all is no reason not to boot."""
        directory = self.spec.boot_slots
        if directory is None or self.accelerator != "tcg" or self._restores():
            return
        count, loop = host_cpus(), asyncio.get_running_loop()
        started, waiting = loop.time(), False
        while True:
            try:
                self._boot_slot = try_take(directory, count)
            except OSError as e:
                log.warning("VM %s boots without a boot slot: %s", self.sandbox_id, e)
                return
            waited = loop.time() - started
            if self._boot_slot is not None:
                break
            if not waiting:
                waiting = True
                log.info("VM %s waits for a boot slot: %d VMs boot at once under TCG",
                         self.sandbox_id, count)
            if waited >= TIMEOUTS.boot_slot:
                log.warning("VM %s boots without a boot slot: none came free in %.0fs",
                            self.sandbox_id, waited)
                return
            await asyncio.sleep(TIMEOUTS.boot_slot_poll)
        stack.callback(self._give_back_boot_slot)
        if waiting:
            log.info("VM %s took a boot slot after %.2fs", self.sandbox_id, waited)

    def _give_back_boot_slot(self) -> None:
        slot, self._boot_slot = self._boot_slot, None
        if slot is not None:
            give_back(slot)

    @property
    def virtiofsd_pid(self) -> int | None:
        """virtiofsd's pid once spawned (virtio-fs only)."""
        return self._virtiofsd.pid if self._virtiofsd else None

    @property
    def accelerator(self) -> str:
        """"kvm" or "tcg" once `start` chose it."""
        return self._accel.accelerator if self._accel else ""

    @property
    def accelerator_reason(self) -> str:
        """Why that accelerator was chosen."""
        return self._accel.reason if self._accel else ""

    @property
    def agent_address(self) -> str:
        """``serial:///<state>/agent.sock`` or ``vsock://<cid>:1024``."""
        vsock = self._devices.of(VsockDevice)
        if vsock and vsock[0].vhost_user:
            return f"hvsock://{self.paths.hybrid_vsock_socket}:{AGENT_VSOCK_PORT}"
        if vsock:
            return f"vsock://{vsock[0].guest_cid}:{AGENT_VSOCK_PORT}"
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
        """(pid, start_time, role) of the VMM and its helpers; persist them for cleanup."""
        return sorted(self._records, key=lambda r: r.role != "vmm")

    # -- devices -------------------------------------------------------------------------

    async def add_device(self, device: Device) -> None:
        """Cold-plug before `start`; after it, the driver's hot-plug."""
        if self._stack is not None:
            async with self._lock:
                await self._hotplug(device)
            return
        if isinstance(device, SharedFsDevice | VsockDevice) and self._devices.of(type(device)):
            raise HypervisorError(
                f"failed to add {type(device).__name__} to VM {self.sandbox_id}: it has one"
            )
        self._devices.add(device)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start virtiofsd (if needed) and the VMM, and connect QMP; undo all on failure."""
        async with self._lock:
            if self._stack is not None or self._proc is not None:
                raise HypervisorError(f"failed to start VM {self.sandbox_id}: already started")
            if not self._devices.of(VsockDevice):
                vsock = self._agent_vsock()
                if vsock is not None:
                    self._devices.add(vsock)
            async with contextlib.AsyncExitStack() as stack:
                stack.callback(self._close_vhost_fds)  # if we fail before the VMM has them
                self.paths.state_dir.mkdir(parents=True, exist_ok=True)
                if self.paths.socket_dir is not None:
                    self.paths.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                stack.callback(self._remove_files)
                self._remove_files()
                self._accel = self._choose_accelerator()
                self._prepare()
                shares = self._devices.of(SharedFsDevice)
                if shares and shares[0].kind == "virtio-fs":
                    await self._start_virtiofsd(stack, shares[0])
                vsocks = self._devices.of(VsockDevice)
                if vsocks and vsocks[0].vhost_user:
                    await self._start_vsock_backend(stack, vsocks[0])
                await self._console_before_spawn(stack)
                await self._before_spawn(stack)
                await self._take_boot_slot(stack)
                await self._spawn_vmm(stack)
                await self._console_after_spawn(stack)
                self._qmp = await self._connect_qmp()
                stack.push_async_callback(self._close_qmp)
                await self._after_connect()
                if self.spec.debug_console and self.paths.debug_console_socket.exists():
                    # A root shell in the guest: root only, whatever the VMM's umask was
                    # (its chardevs exist once QMP answers).
                    os.chmod(self.paths.debug_console_socket, 0o600)
                for helper, wait in self._helpers():
                    watch = asyncio.ensure_future(self._watch_helper(helper, wait))
                    stack.callback(watch.cancel)  # first thing undone: stop() is no death
                self._stack = stack.pop_all()

    def _agent_vsock(self) -> VsockDevice | None:
        """The vsock device for the agent when none was added (None: virtio-serial)."""
        # A CID collision makes the VMM fail loudly at start.
        return VsockDevice(random.randint(3, 2**31 - 1)) if self._wants_vsock() else None

    def _wants_vsock(self) -> bool:
        """Whether to give the agent a kernel vsock channel when none was added."""
        return host_has_vhost_vsock()

    async def _start_vsock_backend(self, stack: contextlib.AsyncExitStack,
                                   vsock: VsockDevice) -> None:
        backend = VsockBackend(self.paths.vsock_socket, self.paths.hybrid_vsock_socket,
                               vsock.guest_cid, self.paths.vsock_backend_stderr)
        self._vsock_backend = backend
        stack.push_async_callback(backend.stop)
        await backend.start()
        self._add_record(backend.pid, "vsock-backend")

    def _close_vhost_fds(self) -> None:
        """Close our copy of a reserved vhost-vsock instance (`hypervisors.vsock.cid`)."""
        for i, device in enumerate(self._devices.devices):
            if isinstance(device, VsockDevice) and device.vhost_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(device.vhost_fd)
                self._devices.devices[i] = dataclasses.replace(device, vhost_fd=None)

    def _helpers(self) -> list[tuple[str, Callable[[], Awaitable[int]]]]:
        """The helper processes the VM cannot run without, and how to wait for each."""
        helpers: list[tuple[str, Callable[[], Awaitable[int]]]] = []
        if self._virtiofsd is not None:
            helpers.append(("virtiofsd", self._virtiofsd.wait))
        if self._vsock_backend is not None:
            helpers.append(("the vsock back-end", self._vsock_backend.wait))
        return helpers

    async def _start_virtiofsd(self, stack: contextlib.AsyncExitStack, fs: SharedFsDevice) -> None:
        vfs = Virtiofsd(
            self.config.virtio_fs_daemon, self.paths.virtiofsd_socket, fs.source,
            self.config.virtio_fs_cache, self.config.virtio_fs_extra_args,
            self.paths.virtiofsd_stderr,
        )
        self._virtiofsd = vfs
        stack.push_async_callback(vfs.stop)
        await vfs.start()
        self._add_record(vfs.pid, "virtiofsd")

    async def _spawn_vmm(self, stack: contextlib.AsyncExitStack) -> None:
        argv = self.build_argv()
        log.debug("VM %s: %s", self.sandbox_id, " ".join(argv))
        try:
            # Emulating the guest's CPU keeps a booting VMM busy: SCHED_BATCH (hostos.procs)
            # lets pods booting at once on few cores switch less, until `booted`
            # (docs/performance.md "Levers").
            self._batch = self.accelerator == "tcg"
            self._proc = await spawn(argv, asyncio.subprocess.PIPE,
                                     pass_fds=self._spawn_fds(), env=self._vmm_env(),
                                     cpu_bound=self._batch)
        except OSError as exc:
            raise HypervisorError(f"failed to start {self.vmm_name} {argv[0]}: {exc}") from exc
        finally:
            self._close_vhost_fds()  # the VMM has its copy (or failed to start)
        self._stderr = StderrLog(self._proc.stderr, self.paths.vmm_stderr)
        stack.push_async_callback(self._stderr.stop)
        stack.push_async_callback(self._kill_vmm)
        self._add_record(self._proc.pid, "vmm")

    def _add_record(self, pid: int | None, role: str) -> None:
        rec = record(pid, role) if pid is not None else None
        if rec is not None:
            self._records.append(rec)

    async def _connect_qmp(self) -> QmpClient:
        """Connect QMP unless the VMM exits first."""
        assert self._proc is not None
        connect = asyncio.create_task(
            QmpClient.connect(self.paths.qmp_socket, dialect=self.qmp_dialect))
        exited = asyncio.create_task(self._proc.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connect, exited):
                task.cancel()
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            return connect.result()
        cause = connect.exception() if connect.done() and not connect.cancelled() else None
        code = await wait_process(self._proc, 0.5)
        if self._stderr is not None:
            await self._stderr.finished(TIMEOUTS.kill_wait)
        what = f"exited with code {code}" if code is not None else str(cause)
        raise HypervisorError(
            f"failed to start {self.vmm_name} for {self.sandbox_id}: {what}; "
            f"stderr:\n{tail(self.paths.vmm_stderr)}"
        )

    async def _watch_helper(self, name: str, wait: Callable[[], Awaitable[int]]) -> None:
        """A VM whose share (virtiofsd) or agent channel (the vsock back-end) died cannot
        serve its containers: end it, so that the sandbox sees the VMM exit
        (`wait_exited`) and tears down, instead of hanging the guest."""
        code = await wait()
        if self._stopping:
            return
        log.error("VM %s: %s exited (status %s) under a running VM: killing %s",
                  self.sandbox_id, name, code, self.vmm_name)  # fmt: skip
        if self._proc is not None:
            signal_child(self._proc)

    async def release_for_adoption(self) -> tuple[int, int | None]:
        """Let another process own this VM (the VM cache hands it to a pod's shim): close
        QMP, and give away the owner socket of its holder and the guest console's
        connection (fds, the caller's to close; no console fd if it never connected).
        From then on `wait_exited` still sees it exit, and `stop` only cleans up after us:
        it never ends the VM."""
        async with self._lock:
            if self._held is None or self._released:
                raise HypervisorError(f"failed to hand VM {self.sandbox_id} over: it is not "
                                      "under a holder, or was handed over already")
            await self._close_qmp()
            console = await self._console.detach() if self._console is not None else None
            self._released = True
            return self._held.give_away(), console

    async def _spawn_held(self, stack: contextlib.AsyncExitStack) -> None:
        """Spawn the VMM under a holder (`hypervisors.held`), so that it can be handed to
        another process later and live as long as that one does."""
        self._batch = self.accelerator == "tcg"
        try:
            held = await HeldVmm.start(self.build_argv(), self._spawn_fds(), self._batch,
                                       self._vmm_env(), self.paths.vmm_stderr)
        finally:
            self._close_vhost_fds()
        self._held = held
        self._stderr = held.stderr
        stack.push_async_callback(self._stderr.stop)
        stack.push_async_callback(held.close)
        self._proc = held.process
        stack.push_async_callback(self._kill_vmm)
        self._add_record(held.process.pid, "vmm")

    async def wait_exited(self) -> int:
        """Wait (no deadline: this is a long poll) until the VMM exits; its return code."""
        if self._proc is None:
            raise HypervisorError(f"failed to wait for VM {self.sandbox_id}: not started")
        return await self._proc.wait()

    async def pause(self) -> None:
        """Stop the vCPUs (QMP ``stop``)."""
        await self._qmp_command("pause", "stop")

    async def resume(self) -> None:
        """Run the vCPUs again (QMP ``cont``)."""
        await self._qmp_command("resume", "cont")

    async def _qmp_command(self, what: str, command: str, **arguments: Any) -> Any:
        try:
            return await self.qmp.execute(command, arguments or None)
        except QmpError as exc:
            raise HypervisorError(f"failed to {what} VM {self.sandbox_id}: {exc}") from exc

    async def stop(self, timeout: float = TIMEOUTS.qemu_quit) -> None:
        """Quit the VMM (SIGKILL after ``timeout``), stop virtiofsd, remove sockets.
        Idempotent."""
        self._stopping = True
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
        if self._proc is None or self._proc.returncode is not None or self._released:
            return
        if self._qmp is not None and not self._qmp.closed:
            try:
                await self._qmp.quit(timeout=timeout)
            except (QmpError, TimeoutError) as exc:
                log.warning("VM %s: QMP quit failed: %s", self.sandbox_id, exc)
        if await wait_process(self._proc, timeout) is None:
            log.warning("VM %s: %s still running %gs after quit", self.sandbox_id,
                        self.vmm_name, timeout)  # fmt: skip

    async def _kill_vmm(self) -> None:
        proc = self._proc
        if proc is None or self._released:
            return
        signal_child(proc)
        code = await wait_process(proc, TIMEOUTS.kill_wait)
        log.info("VM %s: %s pid %d exited with %s", self.sandbox_id, self.vmm_name, proc.pid,
                 code)  # fmt: skip

    async def _close_qmp(self) -> None:
        if self._qmp is not None:
            await self._qmp.close()

    def _remove_files(self) -> None:
        for path in (*self.paths.sockets(), self.paths.vmm_pidfile):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
