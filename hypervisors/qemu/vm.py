"""`Qemu`: one QEMU VM (plus its virtiofsd) as a child of the shim; a `Hypervisor`.

Theory of operation: the lifecycle (state directory, virtiofsd, console log, spawning behind
the parent-death wrapper, QMP connect racing the VMM's exit, quit with a SIGKILL fallback,
idempotent stop, process records) is `hypervisors.vmm.VmmVm`'s, shared with the other
drivers. This module supplies what is QEMU's own:

* the accelerator: KVM where it really works, else TCG, which QEMU's security policy does
  not treat as a boundary, so pods are refused there unless ``allow_tcg`` (`HypervisorRefused`);
* the command line (`hypervisors.qemu.args`) from the cold-plugged devices;
* hot-plug: a device into a running q35 VM needs free PCIe root ports reserved at boot; this
  version does not reserve any, so it refuses with `HypervisorUnsupported`. vCPUs are
  hot-plugged through ``query-hotpluggable-cpus``/``device_add`` up to ``default_maxvcpus``,
  memory as pc-dimm DIMMs up to ``default_maxmemory`` (neither on microvm);
* VM templates (`hypervisors.qemu.template`): with ``VmSpec.template_dir`` set and a
  template that fits, `start` restores the VM from it instead of booting, then plugs the
  share and NICs into the template's root ports; a template that does not fit, or a restore
  that fails, means a normal boot and a log line saying why. `make_template` saves one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

from common.constants import SHARED_FS_TAG
from hostos.holder import HolderMissing, holder_path
from hypervisors.accel import AccelChoice, choose_accelerator, host_tsc_khz
from hypervisors.base import (
    BlockDevice,
    Device,
    NetworkDevice,
    SharedFsDevice,
    SharedFsKind,
    TemplateInfo,
    VmSpec,
    VsockDevice,
)
from hypervisors.channel import Channel, ChannelChoice, ChannelError, choose_channel
from hypervisors.console import ConsoleLog
from hypervisors.errors import (
    HypervisorError,
    HypervisorRefused,
    HypervisorUnsupported,
    QmpError,
)
from hypervisors.qemu import template as tpl
from hypervisors.qemu import vmcache
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv
from hypervisors.qemu.config import MEMORY_BLOCK_MIB, QemuConfig, is_mmio
from hypervisors.vmm import VHOST_VSOCK_DEVICE, VmmVm, host_has_vhost_vsock
from hypervisors.vsock.cid import reserve_guest_cid

__all__ = ["VHOST_VSOCK_DEVICE", "Qemu", "host_has_vhost_vsock"]

log = logging.getLogger(__name__)

SAVE_BOOT_TIMEOUT = 180.0  # a template boots once, under TCG maybe slowly
#: The guest CID behind a vhost-user back-end (3: the first one not reserved).
VHOST_USER_GUEST_CID = 3
HOTPLUG_CPU_PREFIX = "vcpu-hp-"
HOTPLUG_MEM_PREFIX = "mem-hp-"
HOTPLUG_DIMM_PREFIX = "dimm-hp-"


class Qemu(VmmVm[QemuConfig]):
    """One VM for one sandbox (implements `hypervisors.base.Hypervisor`)."""

    vmm_name = "QEMU"

    def __init__(self, config: QemuConfig, vm: VmSpec, *, saving: bool = False,
                 caching: bool = False) -> None:
        """Describe the VM; nothing runs until `start`. ``saving``: boot the template view
        of this VM, for `make_template` to save; ``caching``: boot it on a private memfd,
        for the VM cache to hand out (`hypervisors.qemu.vmcache`)."""
        super().__init__(config, vm)
        self._dimms: list[int] = []  # MiB of each hot-plugged DIMM
        self._saving = saving
        self._caching = caching
        self._lease: vmcache.Lease | None = None  # a VM taken from the VM cache
        self._template: tpl.Template | None = None  # the one `start` restores from
        self._restored = False
        self._ram_fd: int | None = None  # a restored VM's RAM until QEMU has it
        self._ram_fill: asyncio.Future[None] | None = None  # filling it from the template

    @property
    def from_template(self) -> bool:
        """Whether `start` restored this VM from a template or took it from the VM cache:
        either way it runs at its template's size with a clock and RNG not its own until
        the sandbox hands it over."""
        return self._restored

    async def start(self) -> None:
        """Boot the VM, restore it from its template, or take one from the VM cache; a
        failed restore or take boots."""
        try:
            await super().start()
        except HypervisorError as e:
            if self._template is None:
                raise
            source = ("taking a VM from the VM cache" if self._lease is not None else
                      f"restoring from the VM template {self.spec.template_dir}")
            log.warning("VM %s: %s failed, booting instead: %s", self.sandbox_id, source, e)
            self._forget_failed_start()
            self._restored = False
            self._lease = None
            self.spec = dataclasses.replace(self.spec, template_dir=None, vm_cache=None)
            await super().start()

    def _restores(self) -> bool:
        return self._template is not None

    async def _console_before_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        """Take a VM from the VM cache when it has one that fits (its console connection
        comes with it); else listen for the console of the VM we spawn."""
        if self.spec.vm_cache is not None and not (self._saving or self._caching):
            lease = await vmcache.claim(self.spec.vm_cache, self.sandbox_id, self._cache_fit)
            if lease is not None:
                stack.push_async_callback(lease.close)  # last: its holder ends the VM
                self._lease, self._template = lease, lease.shape
                vmcache.move_sockets(vmcache.vm_dirs(self.spec.vm_cache), lease.claimed,
                                    self.paths)
                console = ConsoleLog(self.paths.console_socket, self.paths.console_log)
                fd, lease.console_fd = lease.console_fd, None
                if fd is not None:
                    await console.adopt(fd)
                    stack.push_async_callback(console.stop)
                return
        await super()._console_before_spawn(stack)

    def cache_shape(self, boot_seconds: float) -> tpl.Template:
        """What a pod checks before it takes this cached VM (`_cache_fit`), as a template's
        metadata: its command line's shape, the files it was booted from, its size."""
        vcpus, memory = self.wanted_size()
        return tpl.Template(argv=tpl.shape(self.config, self._device_params()),
                            files=tpl.file_ids(self.config), vcpus=vcpus, memory_mib=memory,
                            created=time.time(), boot_seconds=boot_seconds, save_seconds=0.0,
                            state_bytes=0)

    def _cache_fit(self, shape: tpl.Template) -> str | None:
        params = self._device_params()
        return (tpl.refusal(params, self.config.machine_type)
                or tpl.too_small(shape, *self.wanted_size()) or self._cannot_grow(shape)
                or tpl.mismatch(shape, tpl.shape(self.config, self._at_template_size(
                    params, shape)), tpl.file_ids(self.config)))

    async def _spawn_vmm(self, stack: contextlib.AsyncExitStack) -> None:
        lease = self._lease
        if self._caching:  # handed to a pod later, whose shim then owns it
            await self._spawn_held(stack)
            return
        if lease is None:
            await super()._spawn_vmm(stack)
            return
        self._proc = lease.process
        reason = lease.claimed.reason  # the accelerator is checked by the wire
        self._accel = (AccelChoice("kvm", reason) if lease.claimed.accelerator == "kvm"
                       else AccelChoice("tcg", reason))
        stack.push_async_callback(self._kill_vmm)
        self._add_record(lease.process.pid, "vmm")

    def _prepare(self) -> None:
        self._template = None
        if self.spec.template_dir is None or self._saving:
            return
        why, self._template = self.template_fit(self.spec.template_dir)
        if why:
            log.info("VM %s boots: the VM template %s does not fit it: %s", self.sandbox_id,
                     self.spec.template_dir, why)  # fmt: skip

    def template_fit(self, template_dir: Path) -> tuple[str | None, tpl.Template | None]:
        """Why this VM cannot be restored from ``template_dir`` (None), or the template."""
        params = self._device_params()
        why = tpl.refusal(params, self.config.machine_type)
        if why:
            return why, None
        try:
            template = tpl.load(template_dir)
            why = tpl.too_small(template, *self.wanted_size()) or self._cannot_grow(
                template) or tpl.mismatch(
                template, tpl.shape(self.config, self._at_template_size(params, template)),
                tpl.file_ids(self.config))
        except (tpl.TemplateError, OSError) as e:
            return str(e), None
        return why, None if why else template

    def _cannot_grow(self, template: tpl.Template) -> str | None:
        vcpus, memory = self.wanted_size()
        if memory > template.memory_mib and not self.max_memory_mib():
            return (f"the VM needs more memory than the template's {template.memory_mib} MiB "
                    f"and memory_slots = {self.config.memory_slots} allows no hot-plug")
        if vcpus > max(template.vcpus, self.config.default_maxvcpus):
            return (f"the VM needs {vcpus} vCPUs, more than the template's {template.vcpus}, "
                    f"and default_maxvcpus = {self.config.default_maxvcpus} allows no "
                    "hot-plug to that many")
        return None

    @staticmethod
    def _at_template_size(params: VmParams, template: tpl.Template) -> VmParams:
        """A restored VM starts at its template's size and grows by hot-plug."""
        return dataclasses.replace(params, vcpus=template.vcpus, memory_mib=template.memory_mib)

    async def _grow_to_wanted_size(self) -> None:
        """Hot-plug what the pod's size adds to the template's (the guest onlines it when
        the sandbox asks, as after any hot-plug)."""
        (vcpus, memory), (boot_vcpus, boot_memory) = self.wanted_size(), self.boot_size()
        if vcpus > boot_vcpus and await self._resize_vcpus_locked(vcpus) < vcpus:
            raise HypervisorError(f"failed to give VM {self.sandbox_id} {vcpus} vCPUs after "
                                  "its restore: no free vCPU slot")
        if memory > boot_memory:
            await self._grow_memory_locked(memory)

    def _spawn_fds(self) -> tuple[int, ...]:
        if self._caching:
            return (self._ram_fd,) if self._ram_fd is not None else ()
        if self._template is None:
            return super()._spawn_fds()
        return (self._ram_fd,) if self._ram_fd is not None else ()  # devices: by getfd

    async def _before_spawn(self, stack: contextlib.AsyncExitStack) -> None:
        """A restored VM's RAM: an empty memfd QEMU maps, filled from the template while
        QEMU starts (`_after_connect` waits for it before the state loads). A cached VM's:
        an empty memfd of its size."""
        if self._caching:
            self._ram_fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            stack.push_async_callback(self._drop_ram)
            os.ftruncate(self._ram_fd, self.wanted_size()[1] << 20)
            return
        if self._template is None or self.spec.template_dir is None or self._lease:
            return
        self._ram_fd = tpl.guest_ram(self._template)
        self._ram_fill = asyncio.ensure_future(asyncio.to_thread(
            tpl.fill_guest_ram, self.spec.template_dir, self._template, self._ram_fd))
        stack.push_async_callback(self._drop_ram)

    async def _drop_ram(self) -> None:
        """Close our copy of the RAM's fd once no thread writes to it any more (a cancelled
        start too: the copy's thread cannot be stopped, only waited for)."""
        fill, self._ram_fill = self._ram_fill, None
        cancelled = False
        while fill is not None and not fill.done():
            try:
                await asyncio.shield(fill)
            except asyncio.CancelledError:
                cancelled = True
            except Exception:  # reported by _after_connect, or the start
                pass  # failed elsewhere first
        fd, self._ram_fd = self._ram_fd, None
        if fd is not None:
            os.close(fd)
        if cancelled:
            raise asyncio.CancelledError

    async def _after_connect(self) -> None:
        fill = self._ram_fill
        if fill is not None:
            try:
                await asyncio.shield(fill)
            except OSError as e:
                raise HypervisorError(f"failed to fill VM {self.sandbox_id}'s RAM from its "
                                      f"template: {e}") from e
            await self._drop_ram()  # QEMU has it
        if self._caching:
            await self._drop_ram()
        if self._lease is not None:
            await self._adopted()
            return
        if self._template is None or self.spec.template_dir is None:
            return
        started = time.monotonic()
        fd = tpl.open_state(self.spec.template_dir)
        failure = f"failed to restore VM {self.sandbox_id} from its template"
        try:
            await tpl.load_state(self.qmp, fd)
        except QmpError as e:
            raise HypervisorError(f"{failure}: {e}") from e
        finally:
            os.close(fd)
        await self._make_own(failure)
        log.info("VM %s restored from the VM template %s in %.2fs (saved %s)",
                 self.sandbox_id, self.spec.template_dir, time.monotonic() - started,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._template.created)))

    async def _adopted(self) -> None:
        """A VM from the VM cache: plug the pod's devices, grow it to the pod's size."""
        assert self._lease is not None
        started = time.monotonic()
        await self._make_own(f"failed to take VM {self.sandbox_id} from the VM cache")
        log.info("VM %s taken from the VM cache (%s, pid %d) in %.2fs", self.sandbox_id,
                 self._lease.claimed.dir, self._lease.claimed.pid, time.monotonic() - started)

    async def _make_own(self, failure: str) -> None:
        """A VM booted ahead (restored or cached) made the pod's: its share and NICs into
        the empty root ports, then its size from the template's grown to the pod's."""
        shares = self._devices.of(SharedFsDevice)
        try:
            if shares:
                await tpl.plug_share(self.qmp, self.paths.virtiofsd_socket, shares[0].tag, 0)
            for port, nic in enumerate(self._devices.of(NetworkDevice), start=len(shares)):
                await tpl.plug_nic(self.qmp, nic, port)
            self._restored = True  # from here on its size counts from the template's
            await self._grow_to_wanted_size()
        except QmpError as e:
            raise HypervisorError(f"{failure}: {e}") from e

    async def _hotplug(self, device: Device) -> None:
        raise HypervisorUnsupported(
            f"failed to add {type(device).__name__} to running VM {self.sandbox_id}: "
            "hot-plug needs PCIe root ports this version does not reserve; add devices "
            "before the VM starts"
        )

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

    def vm_params(self) -> VmParams:
        """The per-VM half of the command line (a template's view when saving, restoring
        or caching)."""
        params = self._device_params()
        if self._caching:
            ram = f"/proc/self/fd/{self._ram_fd if self._ram_fd is not None else 'N'}"
            return tpl.template_view(self.config, params, ram)
        if self._template is not None:
            # The fd QEMU inherits (`_spawn_fds`); no fd yet when only asked for the argv.
            ram = f"/proc/self/fd/{self._ram_fd if self._ram_fd is not None else 'N'}"
            return tpl.template_view(self.config, self._at_template_size(params, self._template),
                                     ram, incoming=True)
        if self._saving:
            return tpl.template_view(self.config, params, str(self.paths.state_dir / tpl.RAM_FILE))
        return params

    def _device_params(self) -> VmParams:
        assert self._accel is not None
        vsock = self._devices.of(VsockDevice)
        shares = self._devices.of(SharedFsDevice)
        return VmParams(
            sandbox_id=self.sandbox_id, paths=self.paths, accelerator=self._accel.accelerator,
            agent_channel=_agent_channel(vsock[0] if vsock else None),
            guest_cid=vsock[0].guest_cid if vsock else None,
            vhost_fd=vsock[0].vhost_fd if vsock else None,
            extra_kernel_params=self.spec.kernel_params, vcpus=self.spec.vcpus,
            memory_mib=self.spec.memory_mib, max_memory_mib=self.max_memory_mib(),
            shared_fs=shares[0] if shares else None,
            networks=tuple(self._devices.of(NetworkDevice)),
            blocks=tuple(self._devices.of(BlockDevice)),
            host_tsc_khz=host_tsc_khz() if is_mmio(self.config.machine_type) else None,
            debug_console=self.spec.debug_console,
            image_bytes=os.stat(self.config.image).st_size if self.config.image else 0,
        )

    def build_argv(self) -> list[str]:
        """The QEMU command line for this VM."""
        return build_argv(self.config, self.vm_params())

    # -- resources -----------------------------------------------------------------------

    def boot_size(self) -> tuple[int, int]:
        """(vCPUs, MiB) the VM started with: its template's when it was restored."""
        if self._template is not None and self._restored:
            return self._template.vcpus, self._template.memory_mib
        return self.wanted_size()

    def wanted_size(self) -> tuple[int, int]:
        """(vCPUs, MiB) the VM is to have after `start`."""
        return (self.spec.vcpus or self.config.default_vcpus,
                self.spec.memory_mib or self.config.default_memory)

    async def resize_vcpus(self, count: int) -> int:
        """Hot-plug (or unplug what we plugged) vCPUs up to ``default_maxvcpus``."""
        self._need_hotplug(f"resize to {count} vCPUs")
        most = max(self.config.default_maxvcpus, self.boot_size()[0])
        if not 1 <= count <= most:
            raise HypervisorError(
                f"failed to resize VM {self.sandbox_id} to {count} vCPUs: allowed 1-{most} "
                "(raise default_maxvcpus in the configuration for more)"
            )
        async with self._lock:
            return await self._resize_vcpus_locked(count)

    async def _resize_vcpus_locked(self, count: int) -> int:
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
        0 (no hot-plug) when memory_slots is 0, on microvm, or when the VM was not sized
        for a pod (``VmSpec.memory_mib`` unset) and is no template's: the headroom costs
        ~0.25 s of boot under TCG, so only VMs that may grow with their pod pay it."""
        may_grow = (self.spec.memory_mib is not None or self._saving or self._caching
                    or self.spec.template_dir is not None or self.spec.vm_cache is not None)
        if not self.config.memory_slots or not may_grow or is_mmio(self.config.machine_type):
            return 0
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
        most = self.config.default_maxmemory or host
        return most // MEMORY_BLOCK_MIB * MEMORY_BLOCK_MIB

    async def resize_memory(self, mib: int) -> int:
        """Grow the guest RAM to at least ``mib`` with one more DIMM (pc-dimm on a memfd
        backend when virtio-fs must map it); never shrinks. The MiB it has afterwards."""
        async with self._lock:
            return await self._grow_memory_locked(mib)

    async def _grow_memory_locked(self, mib: int) -> int:
        current = self.boot_size()[1] + sum(self._dimms)
        if mib <= current:
            return current
        self._need_hotplug(f"grow to {mib} MiB")
        most = self.max_memory_mib()
        if not most or len(self._dimms) >= self.config.memory_slots:
            raise HypervisorUnsupported(
                f"failed to grow VM {self.sandbox_id} to {mib} MiB: no free memory slot "
                f"(memory_slots = {self.config.memory_slots})")
        add = -(-(mib - current) // MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB
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

    def _need_hotplug(self, what: str) -> None:
        if is_mmio(self.config.machine_type):
            raise HypervisorUnsupported(
                f"failed to {what} VM {self.sandbox_id}: machine_type "
                f'"{self.config.machine_type}" has no CPU or memory hot-plug (use "q35")')

    def _shares_memory(self) -> bool:
        shares = self._devices.of(SharedFsDevice)
        vsock = self._devices.of(VsockDevice)
        return ((bool(shares) and shares[0].kind == "virtio-fs")
                or (bool(vsock) and vsock[0].vhost_user))

    def channel(self) -> ChannelChoice:
        """The agent channel this VM gets, and why (`hypervisors.channel`)."""
        try:
            return choose_channel(self.config.use_vsock, self.config.vsock_backend,
                                  host_has_vhost_vsock(),
                                  self._saving or self._caching
                                  or self.spec.template_dir is not None
                                  or self.spec.vm_cache is not None)
        except ChannelError as e:
            raise HypervisorError(f"failed to start VM {self.sandbox_id}: {e}") from e

    def _agent_vsock(self) -> VsockDevice | None:
        choice = self.channel()
        log.info("VM %s: agent channel %s", self.sandbox_id, choice.reason)
        if choice.channel is Channel.VHOST_USER_VSOCK:
            # The back-end is the VM's own: its CID is seen by nothing else on the host.
            return VsockDevice(VHOST_USER_GUEST_CID, vhost_user=True)
        if choice.channel is Channel.KERNEL_VSOCK:
            cid, fd = reserve_guest_cid()
            return VsockDevice(cid, vhost_fd=fd)
        return None


def _agent_channel(vsock: VsockDevice | None) -> AgentChannel:
    if vsock is None:
        return AgentChannel.SERIAL
    return AgentChannel.VHOST_USER_VSOCK if vsock.vhost_user else AgentChannel.VSOCK


async def make_template(config: QemuConfig, spec: VmSpec, template_dir: Path,
                        ready_mark: str) -> TemplateInfo:
    """Boot the template view of a VM like ``spec``'s until its console shows ``ready_mark``,
    pause it and save it in ``template_dir`` (emptied first)."""
    why = tpl.refusal(_probe(config, spec)._device_params(), config.machine_type)
    if why:
        raise HypervisorUnsupported(f"failed to make a VM template: {why}")
    if not config.memory_slots:  # pods cannot grow from a smaller template: default size
        spec = dataclasses.replace(spec, memory_mib=None)
    tpl.prepare_dir(template_dir)
    vm = Qemu(config, dataclasses.replace(spec, state_dir=template_dir, socket_dir=template_dir,
                                          template_dir=None), saving=True)
    started = time.monotonic()
    await vm.start()
    try:
        exited = asyncio.ensure_future(vm.wait_exited())
        try:
            await tpl.wait_for_mark(vm.console_log, ready_mark, exited, SAVE_BOOT_TIMEOUT)
        finally:
            exited.cancel()
        booted = time.monotonic() - started
        fd = tpl.open_state(template_dir, write=True)
        try:
            await tpl.save_state(vm.qmp, fd)
        finally:
            os.close(fd)
        vcpus, memory = vm.wanted_size()
        argv = tpl.shape(config, vm._device_params())
        await vm.stop()  # QEMU writes no more to the RAM file
        await asyncio.to_thread(tpl.sparsify_ram, template_dir)
        template = tpl.Template(
            argv=argv, files=tpl.file_ids(config), vcpus=vcpus, memory_mib=memory,
            created=time.time(), boot_seconds=booted,
            save_seconds=time.monotonic() - started - booted,
            state_bytes=os.stat(template_dir / tpl.STATE_FILE).st_size)
        tpl.write_meta(template_dir, template)
    except BaseException:
        for name in (tpl.STATE_FILE, tpl.RAM_FILE, f".{tpl.RAM_FILE}.tmp"):
            with contextlib.suppress(OSError):
                (template_dir / name).unlink()
        raise
    finally:
        await vm.stop()
    ram_bytes = os.stat(template_dir / tpl.RAM_FILE).st_blocks * 512  # its data pages
    return TemplateInfo(template_dir, template.created, template.boot_seconds,
                        template.save_seconds, template.state_bytes + ram_bytes)


def _probe(config: QemuConfig, spec: VmSpec) -> Qemu:
    """A VM like a pod's (the configured share, no NIC), never started: for its parameters."""
    probe = Qemu(config, spec)
    probe._accel = choose_accelerator(config.accelerator)
    if config.shared_fs in ("virtio-fs", "virtio-9p"):
        kind: SharedFsKind = "virtio-fs" if config.shared_fs == "virtio-fs" else "virtio-9p"
        probe._devices.add(SharedFsDevice(Path("/"), kind, SHARED_FS_TAG))
    channel = probe.channel().channel  # no CID reserved: the probe never starts
    if channel is not Channel.SERIAL:
        probe._devices.add(VsockDevice(VHOST_USER_GUEST_CID,
                                       vhost_user=channel is Channel.VHOST_USER_VSOCK))
    return probe


def template_mismatch(config: QemuConfig, spec: VmSpec, template_dir: Path) -> str | None:
    """Why a pod's VM like ``spec``'s would not be restored from ``template_dir``."""
    why, _template = _probe(config, spec).template_fit(template_dir)
    return why


async def serve_vm_cache(config: QemuConfig, spec: VmSpec, count: int, endpoint: Path,
                         ready_mark: str, stop: asyncio.Event) -> None:
    """Run the VM cache (`hypervisors.qemu.vmcache`) until ``stop`` is set, then stop the
    VMs no pod took."""
    why = tpl.refusal(_probe(config, spec)._device_params(), config.machine_type)
    if why:
        raise HypervisorUnsupported(f"failed to start a VM cache: {why}")
    try:
        holder_path()  # every cached VM runs under one: say so now, not at every boot
    except HolderMissing as e:
        raise HypervisorError(f"failed to start a VM cache: {e}") from e
    if not config.memory_slots:  # pods cannot grow from smaller VMs: the default size
        spec = dataclasses.replace(spec, memory_mib=None)
    cache = vmcache.VmCache(config, spec, count, endpoint, ready_mark,
                            lambda c, s: Qemu(c, s, caching=True))
    await cache.run(stop)
