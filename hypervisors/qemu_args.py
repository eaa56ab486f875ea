"""QEMU command line, built from `QemuConfig` plus per-VM parameters. Pure: no I/O.

Theory of operation: each option group is a small frozen dataclass with one method,
``to_argv() -> list[str]`` (the `QemuParam` protocol, after Kata runtime-rs's
``ToQemuParams``). `qemu_params` decides which groups a VM gets; `build_argv` renders them in
order after the binary path. The state directory layout (sockets, console log, pid file) is
`StatePaths`, shared with the `Qemu` facade so both agree on every path.

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

from hypervisors.accel import Accelerator
from hypervisors.config import QemuConfig

SHARED_FS_TAG = "kataShared"
AGENT_PORT_NAME = "agent.channel.0"
AGENT_VSOCK_PORT = 1024
BASE_KERNEL_PARAMS = ("console=ttyS0", "panic=1")


class AgentChannel(enum.Enum):
    """How the host reaches the guest agent."""

    SERIAL = "serial"  # virtio-serial port backed by a unix socket (works everywhere)
    VSOCK = "vsock"  # vhost-vsock-pci; needs /dev/vhost-vsock on the host


@dataclass(frozen=True)
class StatePaths:
    """Files a VM keeps in its sandbox state directory."""

    state_dir: Path

    @property
    def qmp_socket(self) -> Path:
        """QMP control socket (QEMU listens)."""
        return self.state_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        """Host end of the virtio-serial agent port (QEMU listens)."""
        return self.state_dir / "agent.sock"

    @property
    def virtiofsd_socket(self) -> Path:
        """vhost-user socket (virtiofsd listens, QEMU connects)."""
        return self.state_dir / "virtiofsd.sock"

    @property
    def console_log(self) -> Path:
        """Guest serial console output."""
        return self.state_dir / "console.log"

    @property
    def console_socket(self) -> Path:
        """Where QEMU's serial chardev connects (we listen and copy to console_log)."""
        return self.state_dir / "console.sock"

    @property
    def qemu_pidfile(self) -> Path:
        """QEMU's -pidfile."""
        return self.state_dir / "qemu.pid"

    @property
    def qemu_stderr(self) -> Path:
        """QEMU's standard error."""
        return self.state_dir / "qemu.stderr"

    @property
    def virtiofsd_stderr(self) -> Path:
        """virtiofsd's standard error."""
        return self.state_dir / "virtiofsd.stderr"

    def sockets(self) -> tuple[Path, ...]:
        """Every socket path a VM may create (removed on stop)."""
        return (self.qmp_socket, self.agent_socket, self.virtiofsd_socket, self.console_socket)


@dataclass(frozen=True)
class VmParams:
    """What differs between two VMs made from the same configuration."""

    sandbox_id: str
    paths: StatePaths
    accelerator: Accelerator
    agent_channel: AgentChannel = AgentChannel.SERIAL
    guest_cid: int | None = None
    #: Host directory exported with virtio-9p (virtio-fs exports via virtiofsd instead).
    shared_dir: Path | None = None
    extra_kernel_params: tuple[str, ...] = ()


class QemuParam(Protocol):
    """One option group of the QEMU command line."""

    def to_argv(self) -> list[str]:
        """Render this group as QEMU arguments."""
        ...


@dataclass(frozen=True)
class Name:
    """``-name sandbox-<id>``: also how leak checks find our QEMU in /proc."""

    sandbox_id: str

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-name", f"sandbox-{self.sandbox_id}"]


@dataclass(frozen=True)
class Machine:
    """``-machine <type>,accel=<kvm|tcg>``."""

    machine_type: str
    accelerator: Accelerator

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-machine", f"{self.machine_type},accel={self.accelerator}"]


@dataclass(frozen=True)
class Cpu:
    """``-cpu host`` under KVM, ``-cpu max`` (everything TCG can emulate) otherwise."""

    accelerator: Accelerator

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-cpu", "host" if self.accelerator == "kvm" else "max"]


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
    """``-m``; shared (memfd) guest RAM when a vhost-user device must map it (virtio-fs)."""

    size_mib: int
    shared: bool

    def to_argv(self) -> list[str]:
        """Render."""
        argv = ["-m", f"{self.size_mib}M"]
        if self.shared:
            argv += [
                "-object", f"memory-backend-memfd,id=mem,size={self.size_mib}M,share=on",
                "-numa", "node,memdev=mem",
            ]
        return argv


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

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-device", "virtio-serial-pci,id=serial0",
            "-chardev", f"socket,id=agent,path={self.path},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]


@dataclass(frozen=True)
class AgentVsock:
    """vhost-vsock device with the guest's context id."""

    guest_cid: int

    def to_argv(self) -> list[str]:
        """Render."""
        return ["-device", f"vhost-vsock-pci,id=vsock0,guest-cid={self.guest_cid}"]


@dataclass(frozen=True)
class VirtioFs:
    """vhost-user-fs device talking to virtiofsd over its socket."""

    socket: Path
    tag: str = SHARED_FS_TAG

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-chardev", f"socket,id=vfs,path={self.socket}",
            "-device", f"vhost-user-fs-pci,chardev=vfs,tag={self.tag}",
        ]


@dataclass(frozen=True)
class Virtio9p:
    """virtio-9p export of a host directory."""

    path: Path
    tag: str = SHARED_FS_TAG

    def to_argv(self) -> list[str]:
        """Render."""
        return [
            "-fsdev", f"local,id=fs9p,path={self.path},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=fs9p,mount_tag={self.tag}",
        ]


def kernel_params(config: QemuConfig, vm: VmParams) -> tuple[str, ...]:
    """Our base parameters, then the configuration's, then the VM's extras."""
    return (*BASE_KERNEL_PARAMS, *config.kernel_params.split(), *vm.extra_kernel_params)


def qemu_params(config: QemuConfig, vm: VmParams) -> list[QemuParam]:
    """The option groups for one VM, in command-line order."""
    params: list[QemuParam] = [
        Name(vm.sandbox_id),
        Machine(config.machine_type, vm.accelerator),
        Cpu(vm.accelerator),
        Smp(config.default_vcpus, config.default_maxvcpus),
        Memory(config.default_memory, shared=config.shared_fs == "virtio-fs"),
        KernelBoot(config.kernel, config.initrd, kernel_params(config, vm)),
        Headless(),
        SerialConsole(vm.paths.console_socket),
        QmpSocket(vm.paths.qmp_socket),
        PidFile(vm.paths.qemu_pidfile),
        _agent_param(vm),
    ]
    if config.shared_fs == "virtio-fs":
        params.append(VirtioFs(vm.paths.virtiofsd_socket))
    elif config.shared_fs == "virtio-9p":
        if vm.shared_dir is None:
            raise ValueError("failed to build QEMU arguments: virtio-9p needs a shared dir")
        params.append(Virtio9p(vm.shared_dir))
    return params


def _agent_param(vm: VmParams) -> QemuParam:
    if vm.agent_channel is AgentChannel.SERIAL:
        return AgentSerial(vm.paths.agent_socket)
    if vm.guest_cid is None:
        raise ValueError("failed to build QEMU arguments: vsock agent channel needs a guest cid")
    return AgentVsock(vm.guest_cid)


def render(params: Sequence[QemuParam]) -> list[str]:
    """Concatenate the groups' arguments."""
    return [arg for param in params for arg in param.to_argv()]


def build_argv(config: QemuConfig, vm: VmParams) -> list[str]:
    """The full QEMU argv (binary first) for one VM."""
    return [config.path, *render(qemu_params(config, vm))]
