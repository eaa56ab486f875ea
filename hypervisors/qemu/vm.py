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
  memory as pc-dimm DIMMs up to ``default_maxmemory`` (neither on microvm).
"""

from __future__ import annotations

import logging
import os

from hypervisors.accel import AccelChoice, choose_accelerator, host_tsc_khz
from hypervisors.base import (
    BlockDevice,
    Device,
    NetworkDevice,
    SharedFsDevice,
    VmSpec,
    VsockDevice,
)
from hypervisors.errors import (
    HypervisorError,
    HypervisorRefused,
    HypervisorUnsupported,
)
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv, is_mmio
from hypervisors.qemu.config import QemuConfig
from hypervisors.vmm import VHOST_VSOCK_DEVICE, VmmVm, host_has_vhost_vsock

__all__ = ["VHOST_VSOCK_DEVICE", "Qemu", "host_has_vhost_vsock"]

log = logging.getLogger(__name__)

HOTPLUG_CPU_PREFIX = "vcpu-hp-"
HOTPLUG_MEM_PREFIX = "mem-hp-"
HOTPLUG_DIMM_PREFIX = "dimm-hp-"
DIMM_ALIGN_MIB = 128  # the guest's memory block size on x86-64


class Qemu(VmmVm[QemuConfig]):
    """One VM for one sandbox (implements `hypervisors.base.Hypervisor`)."""

    vmm_name = "QEMU"

    def __init__(self, config: QemuConfig, vm: VmSpec) -> None:
        """Describe the VM; nothing runs until `start`."""
        super().__init__(config, vm)
        self._dimms: list[int] = []  # MiB of each hot-plugged DIMM

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
            host_tsc_khz=host_tsc_khz() if is_mmio(self.config.machine_type) else None,
            debug_console=self.spec.debug_console,
        )

    def build_argv(self) -> list[str]:
        """The QEMU command line for this VM."""
        return build_argv(self.config, self.vm_params())

    # -- resources -----------------------------------------------------------------------

    async def resize_vcpus(self, count: int) -> int:
        """Hot-plug (or unplug what we plugged) vCPUs up to ``default_maxvcpus``."""
        boot = self.spec.vcpus or self.config.default_vcpus
        self._need_hotplug(f"resize to {count} vCPUs")
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
        0 (no hot-plug) when memory_slots is 0, on microvm, or when the VM was not sized
        for a pod (``VmSpec.memory_mib`` unset): the headroom costs ~0.25 s of boot under
        TCG, so only VMs that may grow with their pod pay it."""
        if (not self.config.memory_slots or self.spec.memory_mib is None
                or is_mmio(self.config.machine_type)):
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
            self._need_hotplug(f"grow to {mib} MiB")
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

    def _need_hotplug(self, what: str) -> None:
        if is_mmio(self.config.machine_type):
            raise HypervisorUnsupported(
                f"failed to {what} VM {self.sandbox_id}: machine_type "
                f'"{self.config.machine_type}" has no CPU or memory hot-plug (use "q35")')

    def _shares_memory(self) -> bool:
        shares = self._devices.of(SharedFsDevice)
        return bool(shares) and shares[0].kind == "virtio-fs"
