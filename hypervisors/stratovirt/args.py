"""StratoVirt command line for its ``microvm`` machine, built from `StratovirtConfig` plus
per-VM parameters. Pure: no I/O.

Theory of operation: as in `hypervisors.qemu.args`, each option group is a small frozen
dataclass with ``to_argv() -> list[str]`` (the `StratovirtParam` protocol);
`stratovirt_params` decides which groups a VM gets and `build_argv` renders them after the
binary path. The syntax of every group is StratoVirt's documented one, and each group names
the section of StratoVirt's ``docs/config_guidebook.md`` (or ``docs/qmp.md``) it follows.
It was checked against those documents and a scripted stand-in only: no StratoVirt ran.

Rules:

* StratoVirt is never daemonized (no ``-daemonize``, 1.10): the shim keeps it as its child,
  learns of its exit from asyncio, and reads its log on stderr (1.9: without ``-D``, logs go
  to stderr). ``-pidfile`` is still passed, for out-of-process tools.
* microvm devices are virtio-mmio: the ``-device`` drivers end in ``-device`` (2. Device
  Configuration: "For machine type microvm, only virtio-mmio and legacy devices").
* Socket chardevs StratoVirt reads or writes (console, agent port) are its listening sockets
  (``server,nowait``, 2.12 Chardev); the vhost-user chardev of virtio-fs is a client socket
  to virtiofsd (2.17.1).
* A tap's fds keep their numbers in StratoVirt, which inherits them (``pass_fds``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.constants import AGENT_PORT_NAME
from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice
from hypervisors.statepaths import StatePaths
from hypervisors.stratovirt.config import StratovirtConfig

#: The guest console on the legacy serial port (2.6 Serial: "we use serial as ttyS0");
#: reboot=k, panic=1 and pci=off as docs/quickstart.md boots a microvm guest (a guest
#: reboot ends StratoVirt there, which is what we want of a pod VM).
BASE_KERNEL_PARAMS = ("console=ttyS0", "reboot=k", "panic=1", "pci=off")
MACHINE = "microvm"


class AgentChannel(enum.Enum):
    """How the host reaches the guest agent."""

    SERIAL = "serial"  # virtserialport on a virtio-serial-device (2.4)
    VSOCK = "vsock"  # vhost-vsock-device (2.5); needs /dev/vhost-vsock on the host


@dataclass(frozen=True)
class VmParams:
    """What differs between two VMs made from the same configuration."""

    sandbox_id: str
    paths: StatePaths
    agent_channel: AgentChannel = AgentChannel.SERIAL
    guest_cid: int | None = None
    extra_kernel_params: tuple[str, ...] = ()
    vcpus: int | None = None
    memory_mib: int | None = None
    shared_fs: SharedFsDevice | None = None
    networks: tuple[NetworkDevice, ...] = ()
    blocks: tuple[BlockDevice, ...] = ()
    #: The guest's debug console port (`hypervisors.base.VmSpec.debug_console`).
    debug_console: bool = False


class StratovirtParam(Protocol):
    """One option group of the StratoVirt command line."""

    def to_argv(self) -> list[str]:
        """Render this group as StratoVirt arguments."""
        ...


def on_off(flag: bool) -> str:
    """StratoVirt's boolean spelling in ``key=value`` options."""
    return "on" if flag else "off"


@dataclass(frozen=True)
class Name:
    """``-name sandbox-<id>`` (``stratovirt --help``: "set the name of the guest"); also
    how leak checks find our VMM in /proc."""

    sandbox_id: str

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-name", f"sandbox-{self.sandbox_id}"]


@dataclass(frozen=True)
class Machine:
    """1.1 Machine Config: ``-machine [type=]name[,dump-guest-core={on|off}]
    [,mem-share={on|off}]``. Guest memory stays out of StratoVirt's core dumps (it is the
    untrusted guest's, and large); it is shared when virtio-fs needs virtiofsd to map it
    (StratoVirt refuses a vhost-user-fs device otherwise)."""

    shared_memory: bool

    def to_argv(self) -> list[str]:
        """Render."""
        opts = [MACHINE, "dump-guest-core=off"]
        if self.shared_memory:
            opts.append("mem-share=on")
        return ["-machine", ",".join(opts)]


@dataclass(frozen=True)
class Smp:
    """1.2.1 CPU Number: ``-smp [cpus=]n``. No ``maxcpus`` headroom: CPU hot-plug is for
    standard VMs only (docs/cpu_hotplug.md)."""

    vcpus: int

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-smp", str(self.vcpus)]


@dataclass(frozen=True)
class Memory:
    """1.3.1 Memory Size: ``-m [size=]<megs>[m|M|g|G]``."""

    size_mib: int

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-m", f"{self.size_mib}M"]


@dataclass(frozen=True)
class KernelBoot:
    """1.6 Kernel and Kernel Parameters (``-kernel``, ``-append``), 1.7 Initrd
    Configuration (``-initrd``)."""

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
class SerialConsole:
    """2.6 Serial: ``-chardev backend,id=<id>[,path=<path>,server,nowait]`` and
    ``-serial chardev:<id>``. StratoVirt listens; we connect and copy into console.log."""

    path: Path

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-chardev", f"socket,id=console,path={self.path},server,nowait",
                "-serial", "chardev:console"]  # fmt: skip


@dataclass(frozen=True)
class QmpSocket:
    """qmp.md "QMP Creation": ``-qmp unix:/path/to/api/socket,server,nowait``."""

    path: Path

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-qmp", f"unix:{self.path},server,nowait"]


@dataclass(frozen=True)
class PidFile:
    """1.10 Daemonize: ``-pidfile <pidfile_path>`` (without ``-daemonize``)."""

    path: Path

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-pidfile", str(self.path)]


@dataclass(frozen=True)
class SerialPort:
    """2.4 Virtio-console, "virtio mmio device using generic port": a virtio-serial-device
    and one virtserialport on a listening unix socket. The port's ``name`` is its ``id``,
    the name the guest sees (/sys/class/virtio-ports/*/name): `AGENT_PORT_NAME` for the
    agent channel, `DEBUG_CONSOLE_PORT_NAME` for the debug console. ``nr`` is left to
    StratoVirt (2.4: "nr = 0 is only allowed for virtconsole"). A microvm has one
    virtserialport (docs/stratovirt.md), so a VM gets at most one of these."""

    path: Path
    name: str
    chardev: str

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-device", "virtio-serial-device,id=virtio-serial0",
            "-chardev", f"socket,id={self.chardev},path={self.path},server,nowait",
            "-device", f"virtserialport,id={self.name},chardev={self.chardev}",
        ]


@dataclass(frozen=True)
class AgentVsock:
    """2.5 Virtio-vsock: ``-device vhost-vsock-device,id=<vsock_id>,guest-cid=<N>``."""

    guest_cid: int

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-device", f"vhost-vsock-device,id=vsock0,guest-cid={self.guest_cid}"]


@dataclass(frozen=True)
class VirtioFs:
    """2.17.1 virtio fs device: ``-chardev socket,id=<chardevid>,path=<socket_path>`` (a
    client of virtiofsd: no server,nowait) and ``-device vhost-user-fs-device,id=<device
    id>,chardev=<chardevid>,tag=<mount tag>``."""

    socket: Path
    tag: str

    def to_argv(self) -> list[str]:
        """Render."""
        device = f"vhost-user-fs-device,id=vfs0,chardev=vfs,tag={self.tag}"
        return ["-chardev", f"socket,id=vfs,path={self.socket}", "-device", device]


@dataclass(frozen=True)
class VirtioNet:
    """2.3 Virtio-net: ``-netdev tap,id=<netdevid>,fd=<N>`` (``fds=<N>:<M>`` for several
    queues) and ``-device virtio-net-device,id=<net_id>,netdev=<netdev_id>,mac=<macaddr>``.
    StratoVirt has no MTU property: the agent sets the guest interface's MTU."""

    device: NetworkDevice

    def to_argv(self) -> list[str]:
        """Render."""
        d = self.device
        fds = ":".join(str(fd) for fd in d.tap_fds)
        key = "fds" if len(d.tap_fds) > 1 else "fd"
        nic = f"virtio-net-device,id={d.id},netdev=netdev-{d.id},mac={d.mac}"
        return ["-netdev", f"tap,id=netdev-{d.id},{key}={fds}", "-device", nic]


@dataclass(frozen=True)
class VirtioBlock:
    """2.2 Virtio-blk: ``-drive id=<drive_id>,file=<path_on_host>[,readonly={on|off}]
    [,direct={on|off}]`` and ``-device virtio-blk-device,drive=<drive_id>,id=<blkid>``.
    ``direct=off``: O_DIRECT (the default) fails on tmpfs, where state directories live."""

    device: BlockDevice

    def to_argv(self) -> list[str]:
        """Render."""
        d = self.device
        return [
            "-drive",
            f"id=drive-{d.id},file={d.path},readonly={on_off(d.readonly)},direct=off",
            "-device", f"virtio-blk-device,drive=drive-{d.id},id={d.id}",
        ]


def kernel_params(config: StratovirtConfig, vm: VmParams) -> tuple[str, ...]:
    """Our base parameters, then the configuration's, then the VM's extras."""
    return (*BASE_KERNEL_PARAMS, *config.kernel_params.split(), *vm.extra_kernel_params)


def stratovirt_params(config: StratovirtConfig, vm: VmParams) -> list[StratovirtParam]:
    """The option groups for one VM, in command-line order."""
    fs = vm.shared_fs
    virtio_fs = fs is not None and fs.kind == "virtio-fs"
    if fs is not None and not virtio_fs:
        raise ValueError(f"failed to build StratoVirt arguments: {fs.kind} is not supported "
                         "(StratoVirt shares directories with virtio-fs only)")
    params: list[StratovirtParam] = [
        Name(vm.sandbox_id),
        Machine(shared_memory=virtio_fs),
        Smp(vm.vcpus or config.default_vcpus),
        Memory(vm.memory_mib or config.default_memory),
        KernelBoot(config.kernel, config.initrd, kernel_params(config, vm)),
        SerialConsole(vm.paths.console_socket),
        QmpSocket(vm.paths.qmp_socket),
        PidFile(vm.paths.vmm_pidfile),
        _agent_param(vm),
    ]
    if vm.debug_console and vm.agent_channel is AgentChannel.SERIAL:
        _no_debug_console_port()  # on vsock, the agent serves the console on port 1026
    if fs is not None:
        params.append(VirtioFs(vm.paths.virtiofsd_socket, fs.tag))
    params += [VirtioNet(n) for n in vm.networks]
    params += [VirtioBlock(b) for b in vm.blocks]
    return params


def _agent_param(vm: VmParams) -> StratovirtParam:
    if vm.agent_channel is AgentChannel.SERIAL:
        return SerialPort(vm.paths.agent_socket, AGENT_PORT_NAME, "agent")
    if vm.guest_cid is None:
        raise ValueError("failed to build StratoVirt arguments: vsock agent channel needs a "
                         "guest cid")  # fmt: skip
    return AgentVsock(vm.guest_cid)


def _no_debug_console_port() -> None:
    raise ValueError(
        "failed to build StratoVirt arguments: debug_console_enabled needs a second "
        "virtio-serial port, and a StratoVirt microvm has one, taken by the agent channel "
        "here; set use_vsock = true (with vhost_vsock loaded on the host) or turn the "
        "debug console off")  # fmt: skip


def render(params: Sequence[StratovirtParam]) -> list[str]:
    """Concatenate the groups' arguments."""
    return [arg for param in params for arg in param.to_argv()]


def build_argv(config: StratovirtConfig, vm: VmParams) -> list[str]:
    """The full StratoVirt argv (binary first) for one VM."""
    return [config.path, *render(stratovirt_params(config, vm))]
