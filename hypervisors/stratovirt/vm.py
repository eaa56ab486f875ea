"""`Stratovirt`: one StratoVirt microvm (plus its virtiofsd) as a child of the shim; a
`Hypervisor`.

Theory of operation: the lifecycle is `hypervisors.vmm.VmmVm`'s (virtiofsd, console log,
spawn behind the parent-death wrapper, QMP connect racing the VMM's exit, ``quit`` with a
SIGKILL fallback, idempotent stop, process records). What is StratoVirt's own:

* KVM only (config_guidebook.md 1.1: the one ``accel`` is ``kvm``): `start` refuses with
  `HypervisorRefused`, before anything is spawned, where /dev/kvm is not usable;
* the command line (`hypervisors.stratovirt.args`);
* the console: StratoVirt's socket chardevs only listen (2.12 Chardev: ``server,nowait``), so
  `ConsoleClient` connects to its console socket after the spawn and copies into the
  size-capped console.log;
* its QMP dialect (qmp.md): replies to ``qmp_capabilities`` carry no id, and the server
  parses each read as one message, so commands go one at a time (`STRATOVIRT_QMP`);
* hot-plug after start (qmp.md "Hot plug management"): a disk is ``blockdev-add`` then
  ``device_add`` of a ``virtio-blk-mmio`` into one of the microvm's replaceable slots, a NIC
  is ``getfd`` + ``netdev_add`` then ``device_add`` of a ``virtio-net-mmio``; the
  ``node-name``/netdev ``id`` equals the device ``id`` (qmp.md "Micro VM" notes), and
  `remove_device` is ``device_del``. StratoVirt's error replies become `QmpCommandError`s
  inside `HypervisorError`s naming the device;
* no vCPU or memory hot-plug on microvm (docs/cpu_hotplug.md: standard VMs only):
  `resize_vcpus`/`resize_memory` raise `HypervisorUnsupported` unless nothing would change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypervisors import accel
from hypervisors.accel import AccelChoice
from hypervisors.base import (
    BlockDevice,
    Device,
    NetworkDevice,
    SharedFsDevice,
    VmSpec,
    VsockDevice,
)
from hypervisors.console import copy_capped
from hypervisors.errors import HypervisorError, HypervisorRefused, HypervisorUnsupported, QmpError
from hypervisors.qmp import QmpDialect
from hypervisors.stratovirt.args import AgentChannel, VmParams, build_argv
from hypervisors.stratovirt.config import SECTION, StratovirtConfig
from hypervisors.timeouts import TIMEOUTS
from hypervisors.vmm import VmmVm, host_has_vhost_vsock

log = logging.getLogger(__name__)

#: qmp.md: StratoVirt answers ``qmp_capabilities`` without the command's id and reads one
#: message per read (two commands in one read are a parse error).
STRATOVIRT_QMP = QmpDialect(untagged_replies=True, one_command_at_a_time=True)
#: qmp.md device_add example: micro VM hot-plug drivers end in "-mmio".
HOTPLUG_DRIVERS = {"blk": "virtio-blk-mmio", "net": "virtio-net-mmio"}
#: config_guidebook.md 1.9 Logging: STRATOVIRT_LOG_LEVEL, "error" unless asked.
DEBUG_ENV = {"STRATOVIRT_LOG_LEVEL": "info"}


def choose_accelerator() -> AccelChoice:
    """KVM, or `HypervisorError` saying why not (the host probe runs once per process)."""
    return accel.choose_accelerator("kvm")


class ConsoleClient:
    """Connect to the console socket StratoVirt listens on; copy into the capped log."""

    def __init__(self, socket_path: Path, log_path: Path,
                 timeout: float = TIMEOUTS.qmp_connect) -> None:  # fmt: skip
        self.socket_path = socket_path
        self.log_path = log_path
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Dial and copy in the background (StratoVirt creates the socket as it starts)."""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await self._dial()
        except TimeoutError:
            log.warning("no guest console: %s did not accept within %gs", self.socket_path,
                        self.timeout)  # fmt: skip
            return
        try:
            await copy_capped(reader, self.log_path)
        finally:
            writer.close()

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while True:
            try:
                return await asyncio.open_unix_connection(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(TIMEOUTS.poll_interval)

    async def stop(self) -> None:
        """Stop copying (idempotent); the log stays."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Stratovirt(VmmVm[StratovirtConfig]):
    """One StratoVirt VM for one sandbox (implements `hypervisors.base.Hypervisor`)."""

    vmm_name = "StratoVirt"
    qmp_dialect = STRATOVIRT_QMP

    def __init__(self, config: StratovirtConfig, vm: VmSpec) -> None:
        """Describe the VM; nothing runs until `start`."""
        super().__init__(config, vm)
        #: Replaceable slot -> device id, per kind ("blk", "net") (qmp.md device_add addr).
        self._slots: dict[str, dict[int, str]] = {"blk": {}, "net": {}}

    # -- what the lifecycle asks of a driver --------------------------------------------

    def _choose_accelerator(self) -> AccelChoice:
        try:
            choice = choose_accelerator()
        except HypervisorError as e:
            raise HypervisorRefused(
                f"failed to start VM {self.sandbox_id}: StratoVirt runs only on KVM and KVM "
                f"is not usable on this host ({e}); make /dev/kvm usable, or use "
                "[hypervisor.qemu] here") from e
        log.info("VM %s: accelerator %s", self.sandbox_id, choice.reason)
        return choice

    def _wants_vsock(self) -> bool:
        if not self.config.use_vsock:
            return False
        if host_has_vhost_vsock():
            return True
        log.warning("VM %s: /dev/vhost-vsock is missing (modprobe vhost_vsock): the agent "
                    "uses a virtio-serial port instead", self.sandbox_id)  # fmt: skip
        return False

    def _vmm_env(self) -> Mapping[str, str] | None:
        return DEBUG_ENV if self.config.enable_debug else None

    async def _console_before_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        """Nothing: StratoVirt listens on the console socket itself."""

    async def _console_after_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        console = ConsoleClient(self.paths.console_socket, self.paths.console_log)
        console.start()
        stack.push_async_callback(console.stop)

    def vm_params(self) -> VmParams:
        """The per-VM half of the command line."""
        vsock = self._devices.of(VsockDevice)
        shares = self._devices.of(SharedFsDevice)
        return VmParams(
            sandbox_id=self.sandbox_id, paths=self.paths,
            agent_channel=AgentChannel.VSOCK if vsock else AgentChannel.SERIAL,
            guest_cid=vsock[0].guest_cid if vsock else None,
            extra_kernel_params=self.spec.kernel_params, vcpus=self.spec.vcpus,
            memory_mib=self.spec.memory_mib, shared_fs=shares[0] if shares else None,
            networks=tuple(self._devices.of(NetworkDevice)),
            blocks=tuple(self._devices.of(BlockDevice)),
            debug_console=self.spec.debug_console,
        )

    def build_argv(self) -> list[str]:
        """The StratoVirt command line for this VM."""
        try:
            return build_argv(self.config, self.vm_params())
        except ValueError as e:
            raise HypervisorUnsupported(str(e)) from e

    async def add_device(self, device: Device) -> None:
        """Cold-plug before `start`, hot-plug (disks and NICs) after."""
        if isinstance(device, SharedFsDevice) and device.kind != "virtio-fs":
            raise HypervisorUnsupported(
                f"failed to add {device.kind} share to VM {self.sandbox_id}: StratoVirt "
                f'shares directories with virtio-fs only (set shared_fs = "virtio-fs" in '
                f"[{SECTION}])")
        await super().add_device(device)

    # -- hot-plug (qmp.md "Hot plug management") -----------------------------------------

    async def _hotplug(self, device: Device) -> None:
        if isinstance(device, BlockDevice):
            await self._hotplug_block(device)
        elif isinstance(device, NetworkDevice):
            await self._hotplug_net(device)
        else:
            raise HypervisorUnsupported(
                f"failed to add {type(device).__name__} to running VM {self.sandbox_id}: "
                "StratoVirt hot-plugs only virtio-blk and virtio-net devices (qmp.md); add "
                "it before the VM starts")

    def _free_slot(self, kind: str) -> int:
        used = self._slots[kind]
        return next(i for i in range(len(used) + 1) if i not in used)

    async def _hotplug_block(self, d: BlockDevice) -> None:
        slot = self._free_slot("blk")
        what = f"hot-plug disk {d.id} into"
        # qmp.md blockdev-add; "direct": false (tmpfs has no O_DIRECT) needs aio "off"
        # (config_guidebook.md 2.2: native aio goes with direct on).
        await self._qmp_command(what, "blockdev-add", **{
            "node-name": d.id, "read-only": d.readonly, "cache": {"direct": False},
            "file": {"driver": "file", "filename": str(d.path), "aio": "off"}})
        await self._device_add(what, d.id, "blk", slot, drive=d.id)

    async def _hotplug_net(self, d: NetworkDevice) -> None:
        if len(d.tap_fds) != 1:
            raise HypervisorUnsupported(
                f"failed to hot-plug NIC {d.id} into VM {self.sandbox_id}: StratoVirt's micro "
                f"VM takes one tap queue (qmp.md netdev_add), not {len(d.tap_fds)}")
        slot = self._free_slot("net")
        what = f"hot-plug NIC {d.id} into"
        fd_name = f"fd-{d.id}"
        try:
            await self.qmp.get_fd(fd_name, d.tap_fds[0])  # qmp.md "Others": getfd
        except QmpError as exc:
            raise HypervisorError(f"failed to {what} VM {self.sandbox_id}: {exc}") from exc
        # qmp.md netdev_add: "fds" names the getfd'd descriptor.
        await self._qmp_command(what, "netdev_add", id=d.id, fds=fd_name)
        # qmp.md documents "netdev"; StratoVirt's micro VM code (since 2024) reads the
        # backend from "chardev": both are device_add fields, so both are given.
        await self._device_add(what, d.id, "net", slot, netdev=d.id, chardev=d.id, mac=d.mac)

    async def _device_add(self, what: str, ident: str, kind: str, slot: int,
                          **extra: str) -> None:  # fmt: skip
        try:
            await self._qmp_command(what, "device_add", id=ident, driver=HOTPLUG_DRIVERS[kind],
                                    addr=hex(slot), **extra)
        except HypervisorError:
            # The backend stays registered under the id: device_del drops it (best effort).
            with contextlib.suppress(HypervisorError):
                await self._qmp_command(f"roll back {ident} in", "device_del", id=ident)
            raise
        self._slots[kind][slot] = ident

    async def remove_device(self, ident: str) -> None:
        """Unplug a hot-plugged disk or NIC (qmp.md device_del) and free its slot."""
        async with self._lock:
            slots = [(k, s) for k, used in self._slots.items() for s, i in used.items()
                     if i == ident]  # fmt: skip
            if not slots:
                raise HypervisorError(f"failed to remove device {ident} from VM "
                                      f"{self.sandbox_id}: it was not hot-plugged")
            await self._qmp_command(f"remove device {ident} from", "device_del", id=ident)
            kind, slot = slots[0]
            del self._slots[kind][slot]

    async def query_status(self) -> str:
        """The VM's run state (qmp.md query-status), e.g. "running" or "paused"."""
        result: Any = await self._qmp_command("query the status of", "query-status")
        return str(result["status"])

    # -- resources -----------------------------------------------------------------------

    async def resize_vcpus(self, count: int) -> int:
        """The boot count; anything else is unsupported on microvm."""
        boot = self.spec.vcpus or self.config.default_vcpus
        if count == boot:
            return boot
        raise HypervisorUnsupported(
            f"failed to resize VM {self.sandbox_id} to {count} vCPUs: StratoVirt hot-plugs "
            "vCPUs on standard VMs only (docs/cpu_hotplug.md), not on microvm")

    async def resize_memory(self, mib: int) -> int:
        """Never shrinks; growing is unsupported on microvm."""
        boot = self.spec.memory_mib or self.config.default_memory
        if mib <= boot:
            return boot
        raise HypervisorUnsupported(
            f"failed to grow VM {self.sandbox_id} to {mib} MiB: this version has no memory "
            "hot-plug for StratoVirt's microvm")
