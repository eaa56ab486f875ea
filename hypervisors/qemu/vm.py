"""`Qemu`: one QEMU VM (plus its virtiofsd) as a child of the shim; a `Hypervisor`.

Theory of operation: `Qemu.start` runs these steps, each registering its undo on an
`contextlib.AsyncExitStack`, so a failure at any step unwinds the ones before it and leaves
no process or socket behind:

1. create the state directory (undo: remove the sockets and pid file; logs stay);
2. choose the accelerator (`hypervisors.accel`) and log the reason;
3. for a virtio-fs share, start virtiofsd and wait for its socket (undo: stop it);
4. listen for the guest console (`hypervisors.console`: a size-capped console.log);
5. spawn QEMU behind the parent-death wrapper, its stderr copied into a size-capped
   ``<state>/vmm.stderr`` and the cold-plugged devices' fds inherited (undo: SIGKILL and
   wait);
6. connect QMP, racing QEMU's exit: a QEMU that dies during start-up (bad kernel path, ...)
   becomes a `HypervisorError` quoting the tail of vmm.stderr (undo: close QMP).

On success the stack is kept; `Qemu.stop` first asks QEMU to ``quit`` over QMP and waits,
then unwinds the stack (SIGKILL if QEMU is still there, virtiofsd stopped, sockets removed).
`stop` is idempotent and safe after QEMU died on its own. Nothing here blocks the event
loop: waits are asyncio waits with deadlines from `hypervisors.timeouts`.

If virtiofsd dies under a running VM, QEMU is killed: the guest could no longer reach its
containers' files, and the sandbox learns of a dead VM through `wait_exited`.

Devices added before `start` are cold-plugged (`hypervisors.qemu.args`). Hot-plugging a
device into a running q35 VM needs free PCIe root ports reserved at boot; this version does
not reserve any, so it refuses with `HypervisorUnsupported`. vCPUs are hot-plugged through
``query-hotpluggable-cpus``/``device_add`` up to ``default_maxvcpus``.

Concurrency: ``_lock`` serialises `start`, `stop` and resizes; other members are views.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Any

from common.constants import AGENT_VSOCK_PORT
from hostos.procs import ProcessRecord, record, spawn, wait_process
from hypervisors.accel import AccelChoice, choose_accelerator
from hypervisors.base import (
    BlockDevice,
    Device,
    DeviceList,
    NetworkDevice,
    SharedFsDevice,
    VmSpec,
    VsockDevice,
)
from hypervisors.console import ConsoleLog, StderrLog
from hypervisors.errors import (
    HypervisorError,
    HypervisorRefused,
    HypervisorUnsupported,
    QmpError,
)
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv
from hypervisors.qemu.config import QemuConfig
from hypervisors.qmp import QmpClient
from hypervisors.statepaths import StatePaths
from hypervisors.timeouts import TIMEOUTS
from hypervisors.virtiofsd import Virtiofsd, tail

log = logging.getLogger(__name__)

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
HOTPLUG_CPU_PREFIX = "vcpu-hp-"
HOTPLUG_MEM_PREFIX = "mem-hp-"
HOTPLUG_DIMM_PREFIX = "dimm-hp-"
DIMM_ALIGN_MIB = 128  # the guest's memory block size on x86-64


def host_has_vhost_vsock() -> bool:
    """Whether this host can give a VM a vhost-vsock device."""
    return os.path.exists(VHOST_VSOCK_DEVICE)


class Qemu:
    """One VM for one sandbox (implements `hypervisors.base.Hypervisor`)."""

    def __init__(self, config: QemuConfig, vm: VmSpec) -> None:
        """Describe the VM; nothing runs until `start`."""
        self.config = config
        self.spec = vm
        self.sandbox_id = vm.sandbox_id
        self.paths = StatePaths(vm.state_dir, vm.socket_dir)
        self._devices = DeviceList()
        self._lock = asyncio.Lock()
        self._stack: contextlib.AsyncExitStack | None = None
        self._accel: AccelChoice | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._virtiofsd: Virtiofsd | None = None
        self._qmp: QmpClient | None = None
        self._dimms: list[int] = []  # MiB of each hot-plugged DIMM
        self._stderr: StderrLog | None = None
        self._stopping = False  # set by stop(): helpers exiting then are expected
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
        """Cold-plug before `start`; hot-plug is not supported by this version."""
        if self._stack is not None:
            raise HypervisorUnsupported(
                f"failed to add {type(device).__name__} to running VM {self.sandbox_id}: "
                "hot-plug needs PCIe root ports this version does not reserve; add devices "
                "before the VM starts"
            )
        if isinstance(device, SharedFsDevice | VsockDevice) and self._devices.of(type(device)):
            raise HypervisorError(
                f"failed to add {type(device).__name__} to VM {self.sandbox_id}: it has one"
            )
        self._devices.add(device)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start virtiofsd (if needed) and QEMU, and connect QMP; undo everything on failure."""
        async with self._lock:
            if self._stack is not None or self._proc is not None:
                raise HypervisorError(f"failed to start VM {self.sandbox_id}: already started")
            if not self._devices.of(VsockDevice) and host_has_vhost_vsock():
                # A collision makes QEMU fail loudly at start.
                self._devices.add(VsockDevice(random.randint(3, 2**31 - 1)))
            async with contextlib.AsyncExitStack() as stack:
                self.paths.state_dir.mkdir(parents=True, exist_ok=True)
                if self.paths.socket_dir is not None:
                    self.paths.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                stack.callback(self._remove_files)
                self._remove_files()
                self._accel = self._choose_accelerator()
                shares = self._devices.of(SharedFsDevice)
                if shares and shares[0].kind == "virtio-fs":
                    await self._start_virtiofsd(stack, shares[0])
                console = ConsoleLog(self.paths.console_socket, self.paths.console_log)
                await console.start()
                stack.push_async_callback(console.stop)  # after QEMU is gone (LIFO)
                await self._spawn_qemu(stack)
                self._qmp = await self._connect_qmp()
                stack.push_async_callback(self._close_qmp)
                if self._virtiofsd is not None:
                    watch = asyncio.ensure_future(self._watch_virtiofsd(self._virtiofsd))
                    stack.callback(watch.cancel)  # first thing undone: stop() is no death
                self._stack = stack.pop_all()

    def _choose_accelerator(self) -> AccelChoice:
        choice = choose_accelerator(self.config.accelerator)
        log.info("VM %s: accelerator %s", self.sandbox_id, choice.reason)
        if choice.accelerator == "tcg":
            if not self.config.allow_tcg:
                raise HypervisorRefused(
                    f"failed to start VM {self.sandbox_id}: it would run under TCG "
                    f"({choice.reason}), which QEMU does not treat as a security boundary; "
                    "set allow_tcg = true in [hypervisor.qemu] to run pods there anyway"
                )
            log.warning("VM %s runs under TCG: QEMU does not treat software emulation as a "
                        "security boundary (allow_tcg = true)", self.sandbox_id)  # fmt: skip
        return choice

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

    def vm_params(self) -> VmParams:
        """The per-VM half of the command line."""
        assert self._accel is not None
        vsock = self._devices.of(VsockDevice)
        shares = self._devices.of(SharedFsDevice)
        return VmParams(
            sandbox_id=self.sandbox_id, paths=self.paths, accelerator=self._accel.accelerator,
            agent_channel=AgentChannel.VSOCK if vsock else AgentChannel.SERIAL,
            guest_cid=vsock[0].guest_cid if vsock else None,
            extra_kernel_params=self.spec.kernel_params, vcpus=self.spec.vcpus,
            memory_mib=self.spec.memory_mib, max_memory_mib=self.max_memory_mib(),
            shared_fs=shares[0] if shares else None,
            networks=tuple(self._devices.of(NetworkDevice)),
            blocks=tuple(self._devices.of(BlockDevice)),
        )

    async def _spawn_qemu(self, stack: contextlib.AsyncExitStack) -> None:
        argv = build_argv(self.config, self.vm_params())
        log.debug("VM %s: %s", self.sandbox_id, " ".join(argv))
        try:
            self._proc = await spawn(argv, asyncio.subprocess.PIPE,
                                     pass_fds=self._devices.fds())  # fmt: skip
        except OSError as exc:
            raise HypervisorError(f"failed to start QEMU {argv[0]}: {exc}") from exc
        self._stderr = StderrLog(self._proc.stderr, self.paths.vmm_stderr)
        stack.push_async_callback(self._stderr.stop)
        stack.push_async_callback(self._kill_qemu)
        self._add_record(self._proc.pid, "vmm")

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
        cause = connect.exception() if connect.done() and not connect.cancelled() else None
        code = await wait_process(self._proc, 0.5)
        if self._stderr is not None:
            await self._stderr.finished(TIMEOUTS.kill_wait)
        what = f"exited with code {code}" if code is not None else str(cause)
        raise HypervisorError(
            f"failed to start QEMU for {self.sandbox_id}: {what}; "
            f"stderr:\n{tail(self.paths.vmm_stderr)}"
        )

    async def _watch_virtiofsd(self, vfs: Virtiofsd) -> None:
        """A VM whose share died cannot serve its containers: end it, so that the sandbox
        sees the VMM exit (`wait_exited`) and tears down, instead of hanging the guest."""
        code = await vfs.wait()
        if self._stopping:
            return
        log.error("VM %s: virtiofsd exited (status %s) under a running VM: killing QEMU",
                  self.sandbox_id, code)  # fmt: skip
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def wait_exited(self) -> int:
        """Wait (no deadline: this is a long poll) until QEMU exits; its return code."""
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
        """Quit QEMU (SIGKILL after ``timeout``), stop virtiofsd, remove sockets. Idempotent."""
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
        for path in (*self.paths.sockets(), self.paths.vmm_pidfile):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    # -- resources -----------------------------------------------------------------------

    async def resize_vcpus(self, count: int) -> int:
        """Hot-plug (or unplug what we plugged) vCPUs up to ``default_maxvcpus``."""
        boot = self.spec.vcpus or self.config.default_vcpus
        most = max(self.config.default_maxvcpus, boot)
        if not 1 <= count <= most:
            raise HypervisorError(
                f"failed to resize VM {self.sandbox_id} to {count} vCPUs: allowed 1-{most} "
                "(raise default_maxvcpus in the configuration for more)"
            )
        async with self._lock:
            slots = await self._qmp_command("list vCPU slots of", "query-hotpluggable-cpus")
            plugged = [s for s in slots if "qom-path" in s]
            if count > len(plugged):
                for slot in [s for s in slots if "qom-path" not in s][: count - len(plugged)]:
                    props = dict(slot["props"])
                    ident = HOTPLUG_CPU_PREFIX + "-".join(str(v) for v in props.values())
                    await self._qmp_command("hot-plug a vCPU into", "device_add",
                                            driver=slot["type"], id=ident, **props)
            ours = [s["qom-path"].rsplit("/", 1)[-1] for s in plugged
                    if s["qom-path"].rsplit("/", 1)[-1].startswith(HOTPLUG_CPU_PREFIX)]
            for ident in sorted(ours, reverse=True)[: max(0, len(plugged) - count)]:
                # Completes once the guest ejects the CPU: the count may lag.
                await self._qmp_command("unplug a vCPU from", "device_del", id=ident)
            return len(await self._qmp_command("count vCPUs of", "query-cpus-fast"))

    def max_memory_mib(self) -> int:
        """The hot-plug ceiling reserved at boot: default_maxmemory, else the host's RAM.
        0 (no hot-plug) when memory_slots is 0, or when the VM was not sized for a pod
        (``VmSpec.memory_mib`` unset): the headroom costs ~0.25 s of boot under TCG, so
        only VMs that may grow with their pod pay it."""
        if not self.config.memory_slots or self.spec.memory_mib is None:
            return 0
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        most = self.config.default_maxmemory or host
        return most // DIMM_ALIGN_MIB * DIMM_ALIGN_MIB

    async def resize_memory(self, mib: int) -> int:
        """Grow the guest RAM to at least ``mib`` with one more DIMM (pc-dimm on a memfd
        backend when virtio-fs must map it); never shrinks. The MiB it has afterwards."""
        boot = self.spec.memory_mib or self.config.default_memory
        async with self._lock:
            current = boot + sum(self._dimms)
            if mib <= current:
                return current
            most = self.max_memory_mib()
            if not most or len(self._dimms) >= self.config.memory_slots:
                raise HypervisorUnsupported(
                    f"failed to grow VM {self.sandbox_id} to {mib} MiB: no free memory slot "
                    f"(memory_slots = {self.config.memory_slots})")
            add = -(-(mib - current) // DIMM_ALIGN_MIB) * DIMM_ALIGN_MIB
            if current + add > most:
                raise HypervisorError(
                    f"failed to grow VM {self.sandbox_id} to {mib} MiB: more than the "
                    f"{most} MiB reserved (default_maxmemory)")
            n = len(self._dimms)
            backend = "memory-backend-memfd" if self._shares_memory() else "memory-backend-ram"
            extra = {"share": True} if backend == "memory-backend-memfd" else {}
            await self._qmp_command("add memory to", "object-add", **{
                "qom-type": backend, "id": f"{HOTPLUG_MEM_PREFIX}{n}", "size": add << 20,
                **extra})
            await self._qmp_command("hot-plug memory into", "device_add", driver="pc-dimm",
                                    id=f"{HOTPLUG_DIMM_PREFIX}{n}",
                                    memdev=f"{HOTPLUG_MEM_PREFIX}{n}")
            self._dimms.append(add)
            return current + add

    def _shares_memory(self) -> bool:
        shares = self._devices.of(SharedFsDevice)
        return bool(shares) and shares[0].kind == "virtio-fs"
