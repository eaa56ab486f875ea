"""The hypervisor interface: everything the sandbox layer may ask of a VM.

Theory of operation
-------------------
A hypervisor package (``hypervisors/<name>/``, chosen by the configuration's
``[hypervisor.<name>]`` section, see `hypervisors.factory`) exports ``DRIVER``, a
`HypervisorDriver`: it parses its section into a `HypervisorConfig` and creates one
`Hypervisor` per sandbox from that configuration and a `VmSpec`. The sandbox layer sees
nothing else: no QEMU (or StratoVirt) name crosses this line.

A `Hypervisor` is one VM, after Kata runtime-rs's ``Hypervisor`` trait:

* lifecycle: `start` (everything it spawns is undone if it fails), `stop` (idempotent, safe
  after the VMM died), `pause`/`resume`, `wait_exited` (a long poll), `pid`;
* devices: `add_device` before `start` is a cold plug (on the command line); after it, a
  hot plug. A driver that cannot plug a device says so with `HypervisorUnsupported`;
* resources: `resize_vcpus`, `resize_memory` return what the VM has afterwards;
* utilities: where the agent listens (`agent_address`: ``serial://``, ``vsock://`` or
  ``hvsock://``), the accelerator and why, the console log, and the `process_records`
  the sandbox persists so that a later shim can kill what a crashed one left.

Devices are frozen dataclasses of plain values (paths, fds, MACs); fds stay owned by the
caller until the VM has taken them (cold plug: passed at spawn; hot plug: sent over QMP).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from hostos.procs import ProcessRecord

if TYPE_CHECKING:  # the shim's start and delete load this module: no asyncio
    import asyncio

SharedFsKind = Literal["virtio-fs", "virtio-9p"]


@dataclass(frozen=True)
class VmSpec:
    """What differs between two VMs made from the same configuration."""

    sandbox_id: str
    #: Where the VM keeps its files (console log, stderr); the sandbox owns it.
    state_dir: Path
    #: Appended to the configured kernel command line.
    kernel_params: tuple[str, ...] = ()
    #: vCPUs and MiB at boot; None = the configuration's defaults.
    vcpus: int | None = None
    memory_mib: int | None = None
    #: Where the VM's unix sockets live: a short path (sun_path holds 107 bytes, and a CRI
    #: sandbox id alone is 64), owned by the sandbox too. None = ``state_dir``.
    socket_dir: Path | None = None
    #: A second virtio-serial port, ``DEBUG_CONSOLE_PORT_NAME``, on a unix socket the VMM
    #: listens on (`StatePaths.debug_console_socket`, 0600): the guest's debug console.
    debug_console: bool = False
    #: A VM template's directory (``[factory] enable_template``): restore the VM from it
    #: when the template matches this VM, boot it otherwise (the driver logs why).
    template_dir: Path | None = None
    #: The host-wide boot slots (`hostos.slots`, one per host CPU): under TCG a cold boot
    #: takes one before the VMM starts and gives it back once the guest serves, so that
    #: VMs booting at once do not share the cores between more guests than there are
    #: cores. None = no limit.
    boot_slots: Path | None = None
    #: The VM cache's socket (``[factory] vm_cache_number``): take a VM booted ahead from
    #: it when one fits this VM, boot otherwise (the driver logs why).
    vm_cache: Path | None = None


@dataclass(frozen=True)
class SharedFsDevice:
    """A host directory the guest mounts by ``tag``."""

    source: Path
    kind: SharedFsKind
    tag: str


@dataclass(frozen=True)
class NetworkDevice:
    """A guest NIC backed by tap (or macvtap) queue fds the caller opened."""

    id: str
    mac: str
    mtu: int
    tap_fds: tuple[int, ...]


@dataclass(frozen=True)
class BlockDevice:
    """A host file or block device as a guest disk."""

    id: str
    path: Path
    readonly: bool = False


@dataclass(frozen=True)
class VsockDevice:
    """A virtio-vsock device with the guest's context id (the agent channel then uses it):
    the host kernel's (vhost-vsock), or with ``vhost_user`` our back-end process's."""

    guest_cid: int
    vhost_user: bool = False
    #: An open /dev/vhost-vsock that holds ``guest_cid`` (`hypervisors.vsock.cid`), handed
    #: to the VMM; the VM closes its own copy once the VMM has it.
    vhost_fd: int | None = None


Device = SharedFsDevice | NetworkDevice | BlockDevice | VsockDevice


@dataclass(frozen=True)
class TemplateInfo:
    """A saved VM template (``kata-runtime factory``)."""

    path: Path
    #: When it was saved (seconds since the epoch) and how long boot and save took.
    created: float
    boot_seconds: float
    save_seconds: float
    #: What the template holds: its device state and the pages of its RAM that are kept.
    state_bytes: int


@dataclass(frozen=True)
class HostCheck:
    """One line of ``kata-runtime check`` that a driver contributes."""

    name: str
    ok: bool
    detail: str
    required: bool = True


class Hypervisor(Protocol):
    """One VM of one sandbox (see the module docstring)."""

    # -- VM lifecycle
    async def start(self) -> None:
        """Boot the VM; on failure nothing it started is left."""

    async def stop(self) -> None:
        """Stop the VM and its helpers (idempotent)."""

    async def pause(self) -> None:
        """Freeze the vCPUs."""

    async def resume(self) -> None:
        """Let paused vCPUs run again."""

    async def wait_exited(self) -> int:
        """Wait (no deadline) until the VMM exits; its exit status."""

    @property
    def pid(self) -> int | None:
        """The VMM's host pid once started."""

    @property
    def from_template(self) -> bool:
        """Whether `start` restored the VM from a template instead of booting it: the guest
        then runs with the template's clock and RNG state until the sandbox hands it over."""

    def booted(self) -> None:
        """The guest serves: whatever the VMM did only for the boot ends (under TCG, its
        threads leave ``SCHED_BATCH``, so the pod's round trips preempt busy neighbours)."""

    # -- devices
    async def add_device(self, device: Device) -> None:
        """Cold-plug before `start`, hot-plug after."""

    # -- resources
    async def resize_vcpus(self, count: int) -> int:
        """Make the VM have ``count`` vCPUs; the count it has afterwards."""

    async def resize_memory(self, mib: int) -> int:
        """Make the VM have ``mib`` MiB of RAM; the size it has afterwards."""

    # -- utilities
    @property
    def agent_address(self) -> str:
        """Where the agent is reached: ``serial://``, ``vsock://`` or ``hvsock://``."""

    @property
    def accelerator(self) -> str:
        """``kvm`` or ``tcg`` once started ('' before)."""

    @property
    def accelerator_reason(self) -> str:
        """Why that accelerator."""

    @property
    def console_log(self) -> Path:
        """The guest console, kept in the state dir."""

    def process_records(self) -> list[ProcessRecord]:
        """Host processes the VM runs (role ``vmm`` first), for clean-up after a crash."""


class HypervisorConfig(Protocol):
    """What the sandbox layer reads of any hypervisor's configuration section."""

    @property
    def name(self) -> str:
        """The section name: ``qemu`` for ``[hypervisor.qemu]``."""

    @property
    def shared_fs(self) -> str:
        """``virtio-fs``, ``virtio-9p`` or ``none``."""

    @property
    def kernel(self) -> str:
        """The guest kernel's path."""

    @property
    def initrd(self) -> str:
        """The guest initrd's path ("" when the guest boots without one)."""

    @property
    def image(self) -> str:
        """The guest's root image ("" when its files are in the initrd)."""

    @property
    def default_vcpus(self) -> int:
        """vCPUs at boot."""

    @property
    def default_memory(self) -> int:
        """MiB at boot."""

    @property
    def default_maxvcpus(self) -> int:
        """vCPUs a VM may have at most; 0 = as many as the host has."""

    @property
    def default_maxmemory(self) -> int:
        """MiB a VM may have at most; 0 = the host's memory."""

    @property
    def unknown_keys(self) -> tuple[str, ...]:
        """Keys of the section this version does not know (reported, not fatal)."""

    @property
    def unsupported_keys(self) -> tuple[str, ...]:
        """Keys set to something this version does not act on (reported, not fatal)."""

    def check_files(self, source: str) -> None:
        """Raise `ConfigError` if a binary or guest image it names is missing."""

    def with_annotations(self, annotations: Mapping[str, str], source: str) -> HypervisorConfig:
        """This configuration with a pod's ``io.katacontainers.config.hypervisor.*``
        annotations applied where ``enable_annotations`` and ``valid_hypervisor_paths``
        allow them; `hypervisors.annotations.AnnotationError` otherwise."""

    def settings(self) -> dict[str, Any]:
        """Every setting as plain JSON values (``kata-runtime env``)."""


class HypervisorDriver(Protocol):
    """What ``hypervisors/<name>/__init__.py`` exports as ``DRIVER``."""

    @property
    def name(self) -> str:
        """The section name."""

    def parse_config(self, table: Mapping[str, Any], source: str) -> HypervisorConfig:
        """Parse ``[hypervisor.<name>]``; `ConfigError` names the bad key."""

    def create(self, config: HypervisorConfig, vm: VmSpec) -> Hypervisor:
        """A VM that does nothing until started."""

    def host_checks(self, config: HypervisorConfig, source: str) -> list[HostCheck]:
        """Can this host run such VMs (files, binary version, accelerator, agent channel)."""

    async def make_template(self, config: HypervisorConfig, vm: VmSpec,
                            template_dir: Path, ready_mark: str) -> TemplateInfo:
        """Boot a VM shaped like ``vm`` until its console shows ``ready_mark`` (the agent
        serves), and save it in ``template_dir``; `HypervisorUnsupported` if this driver
        has no templates."""

    def template_mismatch(self, config: HypervisorConfig, vm: VmSpec,
                          template_dir: Path) -> str | None:
        """Why a VM shaped like ``vm`` could not be restored from ``template_dir``; None
        when it could."""

    def remove_template(self, template_dir: Path) -> bool:
        """Remove the template's files and directory; False if there was none."""

    async def serve_vm_cache(self, config: HypervisorConfig, vm: VmSpec, count: int,
                             endpoint: Path, ready_mark: str, stop: asyncio.Event) -> None:
        """Keep ``count`` VMs shaped like ``vm`` booted (until their console shows
        ``ready_mark``) and hand them to pods over ``endpoint`` until ``stop`` is set
        (``[factory] vm_cache_number``); `HypervisorUnsupported` if this driver cannot."""

    def remove_vm_cache_leftovers(self, endpoint: Path) -> bool:
        """Remove what a VM cache killed at ``endpoint`` left, unless one serves there;
        False if nothing was left."""


@dataclass
class DeviceList:
    """Devices in plug order, with the fds they hand to the VMM at spawn."""

    devices: list[Device] = field(default_factory=list)

    def add(self, device: Device) -> None:
        """Append a device."""
        self.devices.append(device)

    def of(self, kind: type[Device]) -> list[Any]:
        """The devices of one kind, in order."""
        return [d for d in self.devices if isinstance(d, kind)]

    def fds(self) -> tuple[int, ...]:
        """Every fd the VMM must inherit."""
        vsock = tuple(d.vhost_fd for d in self.of(VsockDevice) if d.vhost_fd is not None)
        return (*(fd for d in self.of(NetworkDevice) for fd in d.tap_fds), *vsock)
