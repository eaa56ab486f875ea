"""QEMU command line, built from `QemuConfig` plus per-VM parameters. Pure: no I/O.

Theory of operation: each option group is a small frozen dataclass with one method,
``to_argv() -> list[str]`` (the `QemuParam` protocol, after Kata runtime-rs's
``ToQemuParams``). `qemu_params` decides which groups a VM gets; `build_argv` renders them in
order after the binary path. Cold-plugged devices (`hypervisors.base`) become option groups
too; a tap's fds keep their numbers in QEMU, which inherits them (``pass_fds``).
`build/bootguest.py` builds its command line here as well, so the two cannot drift.

Two transports: ``q35`` (and other PC machines) put virtio devices on PCI (``-pci``
drivers); ``microvm`` has no PCI bus, so the same devices are virtio-mmio (``-device``
drivers), described to the guest in microvm's small ACPI DSDT (the guest kernel's
virtio_mmio driver binds them), guest RAM for virtio-fs comes from ``memory-backend=`` (no
NUMA there), and there is no vCPU or memory hot-plug headroom to reserve.

Rules: QEMU is never daemonized (we keep it as our child and learn of its exit from
asyncio); everything it would print goes to files in the state directory; the guest console
is the first serial port (``console=ttyS0``), written to ``console.log``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.constants import (
    AGENT_PORT_NAME,
    CRUN_NO_ASLR_KERNEL_PARAM,
    DEBUG_CONSOLE_PORT_NAME,
    GATHER_OUTPUT_KERNEL_PARAM,
    SCHED_THROUGHPUT_KERNEL_PARAM,
)
from hypervisors.accel import Accelerator
from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice
from hypervisors.qemu.config import QemuConfig, is_mmio
from hypervisors.statepaths import StatePaths

#: ``swiotlb=noforce``: no bounce buffer. The kernel sets one up (64 MiB, zeroed: host
#: memory) once RAM may lie above 4 GiB, as hot-plug headroom or the root image's slot
#: makes it, yet no device of ours needs one: virtio devices without
#: VIRTIO_F_ACCESS_PLATFORM bypass the DMA API. Measured: docs/performance.md, "Levers".
BASE_KERNEL_PARAMS = ("console=ttyS0", "panic=1", "swiotlb=noforce")
#: Under TCG the guest kernel skips zeroing every page and slab object it allocates (Debian
#: turns `init_on_alloc` on): emulated, that zeroing was ~35 % of an exec's time here
#: (docs/performance.md, "Levers"). Under KVM (<1 % by the kernel's help text) it stays
#: on. The configured kernel_params come after it, so `init_on_alloc=1` there restores it
#: (docs/security.md).
TCG_NO_INIT_ON_ALLOC = "init_on_alloc=0"
#: microvm without PCI or option ROMs (it keeps the ISA serial console, the RTC and the
#: IO-APIC; its ACPI tables are a DSDT listing the virtio-mmio slots, and the MADT).
MICROVM_OPTIONS = ("pcie=off", "x-option-roms=off")
#: Under TCG there is no kvmclock: without the PIT the guest cannot calibrate its TSC and
#: hangs at boot (seen here), so TCG keeps the PIT and PIC that KVM's "auto" leaves out.
MICROVM_TCG_OPTIONS = ("pit=on", "pic=on")


def virtio(kind: str, mmio: bool) -> str:
    """The QEMU driver of a virtio device on the machine's transport:
    ``virtio-net`` -> ``virtio-net-pci`` (q35) or ``virtio-net-device`` (microvm)."""
    return f"{kind}-device" if mmio else f"{kind}-pci"


class AgentChannel(enum.Enum):
    """How the host reaches the guest agent."""

    SERIAL = "serial"  # virtio-serial port backed by a unix socket (works everywhere)
    VSOCK = "vsock"  # vhost-vsock-pci; needs /dev/vhost-vsock on the host
    VHOST_USER_VSOCK = "vhost-user-vsock"  # vhost-user-vsock-pci, our back-end process


@dataclass(frozen=True)
class VmParams:
    """What differs between two VMs made from the same configuration."""

    sandbox_id: str
    paths: StatePaths
    accelerator: Accelerator
    agent_channel: AgentChannel = AgentChannel.SERIAL
    guest_cid: int | None = None
    vhost_fd: int | None = None  # the /dev/vhost-vsock instance holding guest_cid
    extra_kernel_params: tuple[str, ...] = ()
    vcpus: int | None = None
    memory_mib: int | None = None
    max_memory_mib: int = 0  # hot-plug ceiling (default_maxmemory or the host's RAM)
    shared_fs: SharedFsDevice | None = None
    networks: tuple[NetworkDevice, ...] = ()
    blocks: tuple[BlockDevice, ...] = ()
    #: The host TSC rate, told to a microvm guest under TCG (`hypervisors.accel.tsc_khz`).
    host_tsc_khz: int | None = None
    #: The guest's debug console port (`hypervisors.base.VmSpec.debug_console`).
    debug_console: bool = False
    #: Empty PCIe root ports for hot-plug, and guest RAM shared as a virtio-fs share that
    #: comes later needs: how a VM template is shaped (`hypervisors.qemu.template`).
    hotplug_ports: int = 0
    hotplug_virtio_fs: bool = False
    #: ``-incoming defer``: the VM waits for its state (a restore from a template).
    incoming: bool = False
    #: Guest RAM in this file rather than a memfd of QEMU's own: a template's RAM is kept
    #: as a file and a restored VM's comes filled (`hypervisors.qemu.template`).
    ram_file: str | None = None
    #: The size of the configuration's ``image`` (`hypervisors.qemu.config.QemuConfig`):
    #: its memory backend must name it, and this module does no I/O.
    image_bytes: int = 0


class QemuParam(Protocol):
    """One option group of the QEMU command line."""

    def to_argv(self) -> list[str]:
        """Render this group as QEMU arguments."""
        ...


@dataclass(frozen=True)
class Name:
    """``-name sandbox-<id>``: also how leak checks find our VMM in /proc."""

    sandbox_id: str

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-name", f"sandbox-{self.sandbox_id}"]


@dataclass(frozen=True)
class Machine:
    """``-machine <type>,accel=<kvm|tcg>``; microvm trimmed (`MICROVM_OPTIONS`), its RAM
    from the ``mem`` backend when `Memory` makes one. A bounded TCG translation cache needs
    ``-accel tcg,tb-size=N`` instead of ``accel=`` (QEMU refuses the two together)."""

    machine_type: str
    accelerator: Accelerator
    memory_backend: bool = False
    #: MiB of TCG translation cache; 0 = QEMU's default. Only under TCG.
    tb_size_mib: int = 0

    def to_argv(self) -> list[str]:
        """Render."""
        tb_size = self.tb_size_mib if self.accelerator == "tcg" else 0
        opts = [self.machine_type] if tb_size else [self.machine_type, f"accel={self.accelerator}"]
        if is_mmio(self.machine_type):
            opts += MICROVM_OPTIONS
            if self.accelerator == "tcg":
                opts += MICROVM_TCG_OPTIONS
            if self.memory_backend:
                opts.append("memory-backend=mem")
        argv = ["-machine", ",".join(opts)]
        if is_mmio(self.machine_type):
            # QEMU's virtio-mmio is legacy (virtio 0.9) by default, which vhost-user
            # back-ends refuse: virtiofsd exits "virtio legacy devices aren't supported".
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        if tb_size:
            argv += ["-accel", f"tcg,tb-size={tb_size}"]
        return argv


@dataclass(frozen=True)
class Cpu:
    """``-cpu host`` under KVM, ``-cpu max`` (everything TCG can emulate) otherwise, with
    the configuration's ``cpu_features`` (checked by its parser) after the model."""

    accelerator: Accelerator
    features: str = ""

    def to_argv(self) -> list[str]:
        """Render."""
        model = "host" if self.accelerator == "kvm" else "max"
        return ["-cpu", f"{model},{self.features}" if self.features else model]


@dataclass(frozen=True)
class Smp:
    """``-smp <vcpus>[,maxcpus=<max>]``."""

    vcpus: int
    maxvcpus: int

    def to_argv(self) -> list[str]:
        """Render."""
        if self.maxvcpus > self.vcpus:
            return ["-smp", f"{self.vcpus},maxcpus={self.maxvcpus}"]
        return ["-smp", str(self.vcpus)]


@dataclass(frozen=True)
class Memory:
    """``-m``; shared guest RAM (a memfd, or a file) when a vhost-user device must map it
    (virtio-fs): a NUMA node on PC machines, the machine's ``memory-backend`` on microvm."""

    size_mib: int
    shared: bool
    #: Hot-plug headroom: DIMM slots and the most memory the VM may reach (0: none).
    slots: int = 0
    max_mib: int = 0
    mmio: bool = False
    #: Shared RAM in this file (`VmParams.ram_file`) instead of a memfd.
    file: str | None = None
    #: MiB of memory devices plugged at boot (`RootImage`): one more slot, and room in
    #: maxmem beside whatever DIMMs may come.
    device_mib: int = 0

    def to_argv(self) -> list[str]:
        """Render."""
        size = f"{self.size_mib}M"
        # DIMM slots only where there is room to plug DIMMs into.
        slots = self.slots if self.max_mib > self.size_mib else 0
        max_mib = self.max_mib
        if self.device_mib:
            slots, max_mib = slots + 1, max(max_mib, self.size_mib) + self.device_mib
        if slots:
            size += f",slots={slots},maxmem={max_mib}M"
        argv = ["-m", size]
        if self.shared:
            backend = (f"memory-backend-file,id=mem,size={self.size_mib}M,share=on,"
                       f"mem-path={self.file}" if self.file else
                       f"memory-backend-memfd,id=mem,size={self.size_mib}M,share=on")
            argv += ["-object", backend]
            if not self.mmio:
                argv += ["-numa", "node,memdev=mem"]
        return argv


@dataclass(frozen=True)
class RootImage:
    """The shared read-only root image as a virtio-pmem device: the file mapped read-only
    and shared (the guest mounts it with DAX and reads the host's page cache; a write it
    attempts never reaches the file), taking a memory-device slot (`Memory.device_mib`)."""

    path: str
    size_bytes: int

    @property
    def mib(self) -> int:
        """MiB of guest physical address space it takes."""
        return -(-self.size_bytes // (1 << 20))

    def to_argv(self) -> list[str]:
        """Render."""
        path = self.path.replace(",", ",,")  # QEMU's escape: a comma cannot add options
        return ["-object", f"memory-backend-file,id=rootimg,mem-path={path},"
                f"size={self.size_bytes},share=on,readonly=on",
                "-device", "virtio-pmem-pci,memdev=rootimg,id=rootimg0"]


@dataclass(frozen=True)
class SeccompSandbox:
    """``-sandbox``: QEMU's own seccomp filter (no new privileges, no spawning, ...)."""

    options: str

    def to_argv(self) -> list[str]:
        """Render (nothing when the options are empty)."""
        return ["-sandbox", self.options] if self.options else []


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot: ``-kernel``, ``-initrd`` (if any), ``-append``."""

    kernel: str
    initrd: str
    params: tuple[str, ...]

    def to_argv(self) -> list[str]:
        """Render."""
        argv = ["-kernel", self.kernel]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        return [*argv, "-append", " ".join(self.params)]


@dataclass(frozen=True)
class Firmware:
    """``-bios <file>`` (e.g. qboot, which only boots ``-kernel`` images); nothing when
    unset: QEMU's own firmware for the machine."""

    path: str

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-bios", self.path] if self.path else []


@dataclass(frozen=True)
class Headless:
    """No display, no default devices, no user config files, exit instead of rebooting."""

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"]


@dataclass(frozen=True)
class SerialConsole:
    """First serial port (the guest's ttyS0) to our socket (hypervisors.console caps it)."""

    path: Path

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-chardev", f"socket,id=console,path={self.path},server=off",
                "-serial", "chardev:console"]


@dataclass(frozen=True)
class QmpSocket:
    """QMP monitor on a listening unix socket; QEMU does not wait for a client."""

    path: Path

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-chardev", f"socket,id=qmp,path={self.path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]


@dataclass(frozen=True)
class PidFile:
    """``-pidfile``: lets out-of-process tools find QEMU."""

    path: Path

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-pidfile", str(self.path)]


@dataclass(frozen=True)
class AgentSerial:
    """virtio-serial port ``agent.channel.0`` backed by a listening unix socket."""

    path: Path
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-device", f"{virtio('virtio-serial', self.mmio)},id=serial0",
            "-chardev", f"socket,id=agent,path={self.path},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]


@dataclass(frozen=True)
class DebugConsoleSerial:
    """virtio-serial port ``agent.debug_console.0`` backed by a listening unix socket, for
    ``kata-runtime exec``, on the agent's virtio-serial bus (with the agent on vsock the
    console is on vsock too: no port)."""

    path: Path
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-chardev", f"socket,id=debugconsole,path={self.path},server=on,wait=off",
            "-device", f"virtserialport,chardev=debugconsole,name={DEBUG_CONSOLE_PORT_NAME}",
        ]


@dataclass(frozen=True)
class AgentVsock:
    """vhost-vsock device with the guest's context id (and the vhost-vsock instance that
    holds it, when the shim reserved one)."""

    guest_cid: int
    mmio: bool = False
    vhost_fd: int | None = None

    def to_argv(self) -> list[str]:
        """Render."""
        driver = virtio("vhost-vsock", self.mmio)
        fd = f",vhostfd={self.vhost_fd}" if self.vhost_fd is not None else ""
        return ["-device", f"{driver},id=vsock0,guest-cid={self.guest_cid}{fd}"]


@dataclass(frozen=True)
class AgentVhostUserVsock:
    """vhost-user-vsock device served by our back-end (`hypervisors.vsock.backend`) on
    ``socket``. It has no guest-cid property: QEMU asks the back-end (GET_CONFIG)."""

    socket: Path
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-chardev", f"socket,id=vsock0,path={self.socket}",
                "-device", f"{virtio('vhost-user-vsock', self.mmio)},id=vsock0dev,chardev=vsock0"]


@dataclass(frozen=True)
class VirtioFs:
    """vhost-user-fs device talking to virtiofsd over its socket."""

    socket: Path
    tag: str
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-chardev", f"socket,id=vfs,path={self.socket}",
            "-device", f"{virtio('vhost-user-fs', self.mmio)},chardev=vfs,tag={self.tag}",
        ]


@dataclass(frozen=True)
class Virtio9p:
    """virtio-9p export of a host directory."""

    path: Path
    tag: str
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-fsdev", f"local,id=fs9p,path={self.path},security_model=none",
            "-device", f"{virtio('virtio-9p', self.mmio)},fsdev=fs9p,mount_tag={self.tag}",
        ]


@dataclass(frozen=True)
class VirtioNet:
    """A virtio-net NIC on tap queue fds QEMU inherits (one fd per queue, no vhost)."""

    device: NetworkDevice
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        d = self.device
        fds = ":".join(str(fd) for fd in d.tap_fds)
        netdev = f"tap,id=netdev-{d.id},{'fds' if len(d.tap_fds) > 1 else 'fd'}={fds}"
        nic = (f"{virtio('virtio-net', self.mmio)},netdev=netdev-{d.id},id={d.id},"
               f"mac={d.mac},host_mtu={d.mtu}")
        if len(d.tap_fds) > 1:
            nic += ",mq=on" if self.mmio else f",mq=on,vectors={2 * len(d.tap_fds) + 2}"
        return ["-netdev", netdev, "-device", nic]


@dataclass(frozen=True)
class RootPorts:
    """Empty PCIe root ports ``rp0``.. on q35's root bus, for devices plugged later."""

    count: int

    def to_argv(self) -> list[str]:
        """Render."""
        return [arg for i in range(self.count) for arg in (
            "-device", f"pcie-root-port,id={root_port(i)},bus=pcie.0,chassis=1,slot={i + 1}")]


def root_port(index: int) -> str:
    """The id of the ``index``-th `RootPorts` port."""
    return f"rp{index}"


@dataclass(frozen=True)
class Incoming:
    """``-incoming defer``: start paused, waiting for ``migrate-incoming``."""

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-incoming", "defer"]


@dataclass(frozen=True)
class FreePageReporting:
    """A virtio-balloon that is never inflated, only there for free page reporting: the
    guest tells QEMU which pages it freed and QEMU gives them back to the host."""

    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-device", f"{virtio('virtio-balloon', self.mmio)},id=balloon0,"
                "free-page-reporting=on"]


@dataclass(frozen=True)
class VirtioBlock:
    """A virtio-blk disk on a host file or block device."""

    device: BlockDevice
    mmio: bool = False

    def to_argv(self) -> list[str]:
        """Render."""
        d = self.device
        driver = "host_device" if str(d.path).startswith("/dev/") else "file"
        readonly = "on" if d.readonly else "off"
        return [
            "-blockdev",
            f"driver={driver},node-name=drive-{d.id},filename={d.path},read-only={readonly}",
            "-device", f"{virtio('virtio-blk', self.mmio)},drive=drive-{d.id},id={d.id}",
        ]


def kernel_params(config: QemuConfig, vm: VmParams) -> tuple[str, ...]:
    """Our base parameters, then the configuration's, then the VM's extras. A microvm
    guest under TCG is told the TSC rate: it has no HPET or kvmclock to calibrate against.
    Under TCG the agent also starts crun at fixed addresses, so that QEMU reuses its
    translated code (`CRUN_NO_ASLR_KERNEL_PARAM`; containers keep their randomisation),
    answers process output in larger pieces (`GATHER_OUTPUT_KERNEL_PARAM`) and has the
    scheduler preempt on wake-up less eagerly (`SCHED_THROUGHPUT_KERNEL_PARAM`), and the
    kernel does not zero what it allocates (`TCG_NO_INIT_ON_ALLOC`)."""
    tcg: tuple[str, ...] = ()
    if vm.accelerator == "tcg":
        if is_mmio(config.machine_type) and vm.host_tsc_khz:
            tcg = (f"tsc_early_khz={vm.host_tsc_khz}",)
        tcg += (CRUN_NO_ASLR_KERNEL_PARAM, GATHER_OUTPUT_KERNEL_PARAM,
                SCHED_THROUGHPUT_KERNEL_PARAM, TCG_NO_INIT_ON_ALLOC)
    return (*BASE_KERNEL_PARAMS, *tcg, *config.kernel_params.split(),
            *vm.extra_kernel_params)


def qemu_params(config: QemuConfig, vm: VmParams) -> list[QemuParam]:
    """The option groups for one VM, in command-line order."""
    fs = vm.shared_fs
    mmio = is_mmio(config.machine_type)
    shared_memory = ((fs is not None and fs.kind == "virtio-fs") or vm.hotplug_virtio_fs
                     or vm.agent_channel is AgentChannel.VHOST_USER_VSOCK
                     or vm.ram_file is not None)
    vcpus = vm.vcpus or config.default_vcpus
    image = _root_image(config, vm)
    params: list[QemuParam] = [
        Name(vm.sandbox_id),
        Machine(config.machine_type, vm.accelerator, memory_backend=shared_memory,
                tb_size_mib=config.tcg_tb_size_mib),
        Cpu(vm.accelerator, config.cpu_features),
        # microvm cannot hot-plug vCPUs or memory: no headroom to reserve.
        Smp(vcpus, vcpus if mmio else config.default_maxvcpus),
        Memory(vm.memory_mib or config.default_memory, shared=shared_memory,
               slots=0 if mmio else config.memory_slots, max_mib=vm.max_memory_mib,
               mmio=mmio, file=vm.ram_file, device_mib=image.mib if image else 0),
        Firmware(config.firmware),
        KernelBoot(config.kernel, config.initrd, kernel_params(config, vm)),
        Headless(),
        SeccompSandbox(config.seccompsandbox),
        SerialConsole(vm.paths.console_socket),
        QmpSocket(vm.paths.qmp_socket),
        PidFile(vm.paths.vmm_pidfile),
        _agent_param(vm, mmio),
    ]
    if vm.debug_console and vm.agent_channel is AgentChannel.SERIAL:
        # With the agent on vsock, the agent serves the console on vsock port 1026.
        params.append(DebugConsoleSerial(vm.paths.debug_console_socket, mmio))
    if image is not None:
        params.append(image)
    if fs is not None and fs.kind == "virtio-fs":
        params.append(VirtioFs(vm.paths.virtiofsd_socket, fs.tag, mmio))
    elif fs is not None:
        params.append(Virtio9p(fs.source, fs.tag, mmio))
    params += [VirtioNet(n, mmio) for n in vm.networks]
    params += [VirtioBlock(b, mmio) for b in vm.blocks]
    if config.reclaim_guest_freed_memory:
        params.append(FreePageReporting(mmio))
    if vm.hotplug_ports:
        params.append(RootPorts(vm.hotplug_ports))
    if vm.incoming:
        params.append(Incoming())
    return params


def _root_image(config: QemuConfig, vm: VmParams) -> RootImage | None:
    if not config.image:
        return None
    if vm.image_bytes <= 0:
        raise ValueError("failed to build QEMU arguments: the root image's size is unknown")
    return RootImage(config.image, vm.image_bytes)


def _agent_param(vm: VmParams, mmio: bool) -> QemuParam:
    if vm.agent_channel is AgentChannel.SERIAL:
        return AgentSerial(vm.paths.agent_socket, mmio)
    if vm.agent_channel is AgentChannel.VHOST_USER_VSOCK:
        return AgentVhostUserVsock(vm.paths.vsock_socket, mmio)
    if vm.guest_cid is None:
        raise ValueError("failed to build QEMU arguments: vsock agent channel needs a guest cid")
    return AgentVsock(vm.guest_cid, mmio, vm.vhost_fd)


def render(params: Sequence[QemuParam]) -> list[str]:
    """Concatenate the groups' arguments."""
    return [arg for param in params for arg in param.to_argv()]


def build_argv(config: QemuConfig, vm: VmParams) -> list[str]:
    """The full QEMU argv (binary first) for one VM."""
    return [config.path, *render(qemu_params(config, vm))]
