"""One pod's VM, the agent inside it, the shared rootfs storage and the state on disk.

Theory of operation
-------------------
A `Sandbox` is built with its hypervisor and agent factories (the real ones by default,
fakes in unit tests), so it never names a hypervisor: it asks the factory for a
`hypervisors.base.Hypervisor` and the connector for an `agent_client.AgentApi`.

Its lifecycle is the `TRANSITIONS` table (`sandbox.lifecycle`)::

    NEW --start--> STARTING --started--> RUNNING --stop--> STOPPING --stopped--> STOPPED
                       |                                                    |
                       +--start failed--> NEW          STOPPED --start--> STARTING

``start`` builds the sandbox step by step on an AsyncExitStack: state dir and shared
mount, VM (with the share cold-plugged), agent connection (racing the VM's exit), guest
details, CreateSandbox. Each step registers its undo right away, so a failure at any step
unwinds everything already done, and ``stop`` is that same unwinding after DestroySandbox.
What a crashed shim's ``delete`` needs is written to ``state.json`` as soon as it exists.
The last step starts ``monitor`` (the shim's metrics endpoint, when set), so that it serves
exactly while the sandbox runs and its socket goes before the sandbox's directories.
``_lock`` serialises start and stop.

Once running, a supervisor task watches the VMM (`Hypervisor.wait_exited`) and the agent
(a health check every :data:`HEALTH_INTERVAL` s): either failing ends the sandbox at once
(``stop(graceful=False)``), so every process gets its exit and nothing waits on a dead VM.

The sandbox shares container rootfs into the guest (`create_container` /
`remove_container`) and keeps the set of shares it mounted; it does not own containers or
processes: `sandbox.pod.Pod` does, and drives processes through `guest` (`Guest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import logging
import os
import posixpath
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

from agent_client import AgentApi, AgentCallError, AgentConnector, StorageSpec, bounded
from agent_client import connect_agent as default_connector
from common.constants import DEBUG_CONSOLE_KERNEL_PARAM, GUEST_SHARED_DIR, SHARED_FS_TAG
from hostos import cgroups
from hostos.cgroups import HostCgroup
from hostos.procs import start_time
from hypervisors.annotations import AnnotationError
from hypervisors.base import Hypervisor, HypervisorConfig, SharedFsDevice, SharedFsKind, VmSpec
from hypervisors.config import ConfigError
from hypervisors.errors import HypervisorError, HypervisorRefused, HypervisorUnsupported
from hypervisors.factory import create_hypervisor
from network.model import NetworkModel, model_for
from sandbox import network as pod_network
from sandbox import storage
from sandbox.cleanup import cleanup_after_crash, shim_alive
from sandbox.config import RuntimeConfig
from sandbox.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    SandboxError,
    UnavailableError,
)
from sandbox.guest import Guest, agent_errors
from sandbox.lifecycle import Refusal, transition
from sandbox.logfields import kv
from sandbox.oci import SharedBind, spec_for_guest
from sandbox.portforward import PortMirror
from sandbox.sizing import Limits, VmSize, vm_size
from sandbox.state import (
    NetworkRecord,
    ProcessRecord,
    SandboxRecord,
    boot_slots_path,
    make_sandbox_dir,
    monitor_socket_path,
    read_record,
    remove_namespace_dir_if_empty,
    remove_socket_dir,
    sandbox_path,
    socket_dir_path,
    write_record,
)
from sandbox.threads import in_thread
from sandbox.types import ContainerConfig, SandboxSpec, validate_id

log = logging.getLogger(__name__)

HypervisorFactory = Callable[[HypervisorConfig, VmSpec], Hypervisor]
#: Starts the shim's metrics endpoint on a socket path; returns its stop.
MonitorStarter = Callable[[Path], Awaitable[Callable[[], Awaitable[None]]]]

#: The agent is asked every HEALTH_INTERVAL seconds whether it answers (within
#: HEALTH_TIMEOUT; guests under TCG are slow); HEALTH_FAILURES misses in a row end the pod.
HEALTH_INTERVAL = 10.0
HEALTH_TIMEOUT = 10.0
HEALTH_FAILURES = 3
#: Seconds to wait, when the agent's connection fails during boot, for the VM's exit to show:
#: then the error says the VM exited (and quotes its console) rather than a reset.
VM_EXIT_GRACE = 2.0


class SandboxState(enum.Enum):
    """Where a sandbox is in its life."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SandboxOp(enum.Enum):
    """What can happen to a sandbox (the value reads in ``failed to <op> sandbox``)."""

    START = "start"
    STARTED = "finish starting"
    START_FAILED = "abandon starting"
    STOP = "stop"
    STOPPED = "finish stopping"
    USE = "use"


_S, _O = SandboxState, SandboxOp
_NOT_RUNNING = Refusal(UnavailableError, "it is not running")
_INTERNAL = Refusal(FailedPreconditionError, "not in this state")
TRANSITIONS: dict[tuple[SandboxState, SandboxOp], SandboxState | Refusal] = {
    (_S.NEW, _O.START): _S.STARTING,
    (_S.NEW, _O.STARTED): _INTERNAL,
    (_S.NEW, _O.START_FAILED): _INTERNAL,
    (_S.NEW, _O.STOP): _S.STOPPED,  # nothing was started: nothing to undo
    (_S.NEW, _O.STOPPED): _INTERNAL,
    (_S.NEW, _O.USE): _NOT_RUNNING,
    (_S.STARTING, _O.START): Refusal(FailedPreconditionError, "it is starting"),
    (_S.STARTING, _O.STARTED): _S.RUNNING,
    (_S.STARTING, _O.START_FAILED): _S.NEW,  # everything was undone: may start again
    (_S.STARTING, _O.STOP): Refusal(FailedPreconditionError, "it is starting"),
    (_S.STARTING, _O.STOPPED): _INTERNAL,
    (_S.STARTING, _O.USE): Refusal(UnavailableError, "it is still starting"),
    (_S.RUNNING, _O.START): Refusal(AlreadyExistsError, "it is already running"),
    (_S.RUNNING, _O.STARTED): _INTERNAL,
    (_S.RUNNING, _O.START_FAILED): _INTERNAL,
    (_S.RUNNING, _O.STOP): _S.STOPPING,
    (_S.RUNNING, _O.STOPPED): _INTERNAL,
    (_S.RUNNING, _O.USE): _S.RUNNING,
    (_S.STOPPING, _O.START): Refusal(FailedPreconditionError, "it is stopping"),
    (_S.STOPPING, _O.STARTED): _INTERNAL,
    (_S.STOPPING, _O.START_FAILED): _INTERNAL,
    (_S.STOPPING, _O.STOP): Refusal(FailedPreconditionError, "it is already stopping"),
    (_S.STOPPING, _O.STOPPED): _S.STOPPED,
    (_S.STOPPING, _O.USE): Refusal(UnavailableError, "it is stopping"),
    (_S.STOPPED, _O.START): _S.STARTING,  # a new VM for the same pod (same daemon)
    (_S.STOPPED, _O.STARTED): _INTERNAL,
    (_S.STOPPED, _O.START_FAILED): _INTERNAL,
    (_S.STOPPED, _O.STOP): _S.STOPPED,  # idempotent
    (_S.STOPPED, _O.STOPPED): _INTERNAL,
    (_S.STOPPED, _O.USE): _NOT_RUNNING,
}


def host_memory_mib() -> int:
    """The host's RAM in MiB (the ceiling of a VM when default_maxmemory is 0)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


def vm_spec(config: RuntimeConfig, sandbox_id: str, state_dir: Path, socket_dir: Path | None,
            size: VmSize) -> VmSpec:
    """The VM of a pod (or of the VM template, `sandbox.template`, which must match it)."""
    console = config.agent.debug_console_enabled
    return VmSpec(sandbox_id, state_dir, vcpus=size.vcpus, memory_mib=size.memory_mib,
                  socket_dir=socket_dir, debug_console=console,
                  kernel_params=(DEBUG_CONSOLE_KERNEL_PARAM,) if console else (),
                  template_dir=config.factory.template_dir,
                  boot_slots=boot_slots_path(config.state_dir),
                  vm_cache=(config.factory.cache_endpoint(config.state_dir)
                            if config.factory.vm_cache_number else None))


def shared_storage(config: HypervisorConfig) -> tuple[SharedFsKind, StorageSpec]:
    """The share's device kind and how the guest mounts it, for ``shared_fs``."""
    if config.shared_fs == "virtio-fs":
        return "virtio-fs", StorageSpec("virtio-fs", SHARED_FS_TAG, "virtiofs", GUEST_SHARED_DIR)
    if config.shared_fs == "virtio-9p":
        return "virtio-9p", StorageSpec("9p", SHARED_FS_TAG, "9p", GUEST_SHARED_DIR)
    raise InvalidArgumentError(
        f"hypervisor.{config.name}.shared_fs = {config.shared_fs!r} cannot carry container "
        "rootfs: use \"virtio-fs\" (or \"virtio-9p\" with a guest kernel that has 9p)"
    )


class Sandbox:
    """A pod's VM, agent and storage (see the module docstring)."""

    def __init__(
        self, sandbox_id: str, config: RuntimeConfig, *, namespace: str = "default",
        hypervisor_factory: HypervisorFactory = create_hypervisor,
        agent_connector: AgentConnector = default_connector,
        network_model: Callable[[str], NetworkModel | None] = model_for,
    ) -> None:
        self.id = validate_id("sandbox", sandbox_id)
        self.namespace = validate_id("namespace", namespace)
        self.config = config
        self.state = SandboxState.NEW
        self.spec = SandboxSpec()
        self.state_path = sandbox_path(config.state_dir, self.namespace, self.id)
        self.socket_dir = socket_dir_path(config.state_dir, self.namespace, self.id)
        #: Where the host mounts container rootfs and volumes; the guest never sees it.
        self.mounts_dir = self.state_path / "mounts"
        #: The guest's read-only view of ``mounts_dir`` (what the VM shares).
        self.shared_dir = self.state_path / "shared"
        self.boot_seconds = 0.0
        self.vcpus = 0  # the VM's vCPUs (boot size, then grown by fit_vcpus)
        self.memory_mib = 0  # the VM's memory (boot size, then grown by fit_memory)
        #: Process calls on the current agent connection (UNAVAILABLE unless running).
        self.guest = Guest(self._agent_or_raise)
        self._hypervisor_factory = hypervisor_factory
        self._agent_connector = agent_connector
        self._network_model = network_model
        #: The guest's listening ports on the pod netns's loopback (port-forward).
        self.port_mirror: PortMirror | None = None
        #: Started once the sandbox runs, stopped first when it stops (the shim sets it).
        self.monitor: MonitorStarter | None = None
        self.monitor_socket = monitor_socket_path(config.state_dir, self.namespace, self.id)
        self._lock = asyncio.Lock()  # serialises start and stop
        self._vm: Hypervisor | None = None
        self._agent: AgentApi | None = None
        self._undo: AsyncExitStack | None = None
        self._supervisor: asyncio.Future[None] | None = None
        self._shares: set[str] = set()  # container ids whose rootfs this sandbox mounted
        self._record = SandboxRecord(
            sandbox_id=self.id, namespace=self.namespace, hypervisor=config.hypervisor.name,
            shim_pid=os.getpid(),
            shim_start_time=start_time(os.getpid()) or 0,
            config_path=str(config.path), debug_console=config.agent.debug_console_enabled,
        )

    # evidence for logs and the demo
    @property
    def vmm_pid(self) -> int | None:
        """Host pid of the VMM, while it runs."""
        return self._vm.pid if self._vm else None

    @property
    def accelerator(self) -> str:
        """kvm or tcg."""
        return self._vm.accelerator if self._vm else ""

    @property
    def accelerator_reason(self) -> str:
        """Why that accelerator was chosen."""
        return self._vm.accelerator_reason if self._vm else ""

    @property
    def guest_kernel_release(self) -> str:
        """``uname -r`` inside the guest."""
        return self._record.guest_kernel_release

    @property
    def console_log(self) -> Path:
        """The guest console, saved in the state dir."""
        return self.state_path / "console.log"

    def _step(self, op: SandboxOp) -> SandboxState:
        return transition(TRANSITIONS, self.state, op, f"sandbox {self.id}")

    # lifecycle
    async def start(self, spec: SandboxSpec) -> None:
        """Boot the VM and prepare the agent; on failure leave nothing behind."""
        async with self._lock:
            after = self._step(SandboxOp.START)
            try:
                self.config = dataclasses.replace(self.config, hypervisor=(
                    self.config.hypervisor.with_annotations(spec.annotations,
                                                            str(self.config.path))))
                self.config.hypervisor.check_files(str(self.config.path))
            except (ConfigError, AnnotationError) as e:
                raise InvalidArgumentError(f"failed to start sandbox {self.id}: {e}") from e
            shared_storage(self.config.hypervisor)  # refuse a share we cannot use, early
            if spec.host_network:
                raise InvalidArgumentError(
                    f"failed to start sandbox {self.id}: it asks for the host's network "
                    "(hostNetwork, or no network namespace in its spec), which a VM cannot "
                    "share; run such pods with runc, or give the pod a network of its own")
            self.state, self.spec = after, spec
            try:
                await self._start(spec)
            except BaseException as e:
                self.state = self._step(SandboxOp.START_FAILED)
                if isinstance(e, OSError | HypervisorError):
                    # Everything was undone; say what failed with a status containerd knows.
                    raise UnavailableError(f"failed to start sandbox {self.id}: {e}") from e
                raise
            self.state = self._step(SandboxOp.STARTED)

    async def _start(self, spec: SandboxSpec) -> None:
        started = time.monotonic()
        async with AsyncExitStack() as stack:
            await self._make_state_dir(stack)
            cgroup = await self._make_host_cgroup(spec, stack)
            size = self._vm_size(spec)
            network = await self._wire_network(spec, stack)
            vm = await self._start_vm(stack, size, network)
            self.vcpus = size.vcpus or self.config.hypervisor.default_vcpus
            self.memory_mib = size.memory_mib or self.config.hypervisor.default_memory
            await self._join_host_cgroup(cgroup, vm)
            agent = await self._connect_agent(vm, stack)
            if vm.from_template:
                await self._hand_over(agent)
            vm.booted()
            async with agent_errors("get guest details"):
                guest = await agent.guest_details()
            log.info(
                "agent ready: started in %.2fs, serving at guest uptime %.2fs, %.2fs after "
                "the sandbox start began%s", guest.agent_init_seconds,
                guest.agent_startup_seconds, time.monotonic() - started,
                " (the first two are of the VM booted ahead)" if vm.from_template else "",
            )
            _kind, share = shared_storage(self.config.hypervisor)
            async with agent_errors("create the sandbox in the guest"):
                await agent.create_sandbox(self.id, spec.hostname or self.id[:63], [share])
            if network is not None:
                async with agent_errors("configure the pod's network in the guest"):
                    await pod_network.configure_guest(agent, network)
                self.port_mirror = PortMirror(spec.netns_path, agent)
                self.port_mirror.start()
                stack.push_async_callback(self.port_mirror.close)
            self._record.guest_kernel_release = guest.kernel_release
            self._save()
            await self._start_monitor(stack)
            self._undo = stack.pop_all()
        self.boot_seconds = time.monotonic() - started
        self._supervisor = asyncio.ensure_future(self._supervise(vm, agent))

    async def _start_monitor(self, stack: AsyncExitStack) -> None:
        """The metrics endpoint: a pod runs without it rather than not at all."""
        if self.monitor is None:
            return
        try:
            stack.push_async_callback(await self.monitor(self.monitor_socket))
        except OSError as e:
            log.warning("sandbox %s: no metrics endpoint at %s: %s", self.id,
                        self.monitor_socket, e)

    async def _make_state_dir(self, stack: AsyncExitStack) -> None:
        if self.state_path.exists():
            await in_thread(self._clear_stale_state)
        make_sandbox_dir(self.state_path)
        stack.callback(remove_socket_dir, self.socket_dir)
        # umount can block on a sync: keep it off the event loop.
        stack.callback(remove_namespace_dir_if_empty, self.state_path)
        stack.push_async_callback(in_thread, storage.remove_tree, self.state_path)
        stack.push_async_callback(in_thread, storage.unmount_tree, self.state_path)
        # The record (naming this shim) before anything else goes in: the `shim delete` of a
        # previous shim of this id, which containerd may still be running, cleans a state
        # dir that has content and no live shim's record (`sandbox.cleanup`).
        self._save()
        await in_thread(storage.prepare_share, self.mounts_dir, self.shared_dir)

    def _clear_stale_state(self) -> None:
        """A state dir for our id: refuse if its shim lives, else clean up what it left."""
        record = read_record(self.state_path)
        if record is not None and shim_alive(record):
            raise AlreadyExistsError(
                f"failed to create sandbox {self.id}: shim pid {record.shim_pid} still runs it"
            )
        log.warning("sandbox %s: cleaning up what a dead shim left in %s", self.id,
                    self.state_path)
        cleanup_after_crash(self.config.state_dir, self.namespace, self.id)

    def _vm_size(self, spec: SandboxSpec) -> VmSize:
        config, hv = self.config, self.config.hypervisor
        size = vm_size(spec.resources, Limits(
            static=config.static_sandbox_resource_mgmt,
            base_memory_mib=config.static_sandbox_base_memory,
            max_vcpus=hv.default_maxvcpus, max_memory_mib=hv.default_maxmemory,
            host_cpus=os.cpu_count() or 1, host_memory_mib=host_memory_mib()))
        if size.vcpus or size.memory_mib:
            log.info("VM sized from the pod's limits: %s vCPUs, %s MiB",
                     size.vcpus or hv.default_vcpus, size.memory_mib or hv.default_memory)
        return size

    async def fit_vcpus(self, wanted: int) -> None:
        """Hot-plug vCPUs so the VM has ``wanted`` (static sizing only; never shrinks),
        within default_maxvcpus, and have the guest bring them online."""
        hv = self.config.hypervisor
        most = max(hv.default_maxvcpus, self.vcpus)
        target = min(wanted, most)
        if not self.config.static_sandbox_resource_mgmt or target <= self.vcpus:
            if wanted > most:
                log.warning("the pod's containers may use %d CPUs; the VM has %d "
                            "(default_maxvcpus = %d)", wanted, self.vcpus, hv.default_maxvcpus)
            return
        vm = self._vm
        if vm is None or self.state is not SandboxState.RUNNING:
            raise UnavailableError(f"failed to add vCPUs to sandbox {self.id}: it is not running")
        try:
            await vm.resize_vcpus(target)
        except HypervisorUnsupported as e:  # the limits still hold in the guest's cgroups
            log.warning("the VM stays at %d vCPUs, fewer than its containers may use (%d): "
                        "%s", self.vcpus, target, e)
            return
        except HypervisorError as e:
            raise UnavailableError(f"failed to add vCPUs to sandbox {self.id}: {e}") from e
        online = await self.guest.online_cpus(target)
        self.vcpus = target
        log.info("VM grown to %d vCPUs (%d online in the guest)", target, online)

    async def fit_memory(self, limits_mib: int) -> None:
        """Hot-plug memory so the VM holds the containers' limits plus the base (static
        sizing only; never shrinks), and have the guest bring it online."""
        if not self.config.static_sandbox_resource_mgmt:
            return
        wanted = self.config.static_sandbox_base_memory + limits_mib
        if wanted <= self.memory_mib:
            return
        vm = self._vm
        if vm is None or self.state is not SandboxState.RUNNING:
            raise UnavailableError(f"failed to add memory to sandbox {self.id}: it is not "
                                   "running")
        try:
            total = await vm.resize_memory(wanted)
        except HypervisorError as e:  # the limits still hold in the guest's cgroups
            log.warning("the VM stays at %d MiB, less than its containers' limits plus the "
                        "base (%d MiB): %s", self.memory_mib, wanted, e)
            return
        online = await self.guest.online_memory(total)
        self.memory_mib = total
        log.info("VM grown to %d MiB (%d MiB online in the guest)", total, online)

    async def _make_host_cgroup(self, spec: SandboxSpec,
                                stack: AsyncExitStack) -> HostCgroup | None:
        """The pod's child cgroup for the VMM and virtiofsd (sandbox_cgroup_only)."""
        path = cgroups.checked_path(spec.cgroups_path)
        if not self.config.sandbox_cgroup_only or path is None:
            if self.config.sandbox_cgroup_only and spec.cgroups_path:
                log.warning("sandbox cgroup %r is neither a cgroupfs nor a systemd path: the "
                            "VMM stays in the shim's cgroup", spec.cgroups_path)
            return None
        cgroup = await in_thread(cgroups.HostCgroup.make, path,
                                 cgroups.hierarchies(await in_thread(cgroups.read_mountinfo)))
        stack.push_async_callback(in_thread, cgroup.remove)  # after the VM stopped (LIFO)
        if not cgroup.dirs:
            # Not a Kubernetes pod (ctr gives /<namespace>/<id>): nothing to join.
            log.info("no pod cgroup %s on the host: the VMM stays in the shim's cgroup",
                     posixpath.dirname(path))
            return None
        self._record.host_cgroups = list(cgroup.dirs)
        return cgroup

    async def _join_host_cgroup(self, cgroup: HostCgroup | None, vm: Hypervisor) -> None:
        if cgroup is None:
            return
        for r in vm.process_records():
            try:
                await in_thread(cgroup.add, r.pid)
            except OSError as e:
                raise UnavailableError(f"failed to move the {r.role} (pid {r.pid}) into the "
                                       f"pod's cgroup {cgroup.dirs[0]}: {e}") from e
        try:  # the shim's per-pod work is the pod's too (Kata's sandbox_cgroup_only)
            await in_thread(cgroup.join_self)
        except OSError as e:
            log.warning("the shim stays in its cgroup: %s", e)
        log.info("VM processes and the shim in the pod's cgroup %s", ", ".join(cgroup.dirs))

    async def _wire_network(self, spec: SandboxSpec,
                            stack: AsyncExitStack) -> pod_network.PodNetwork | None:
        """The pod netns's interfaces wired for the VM (internetworking_model)."""
        model = self._network_model(self.config.internetworking_model)
        if model is None or not spec.netns_path:
            if model is not None:
                log.info("the sandbox's spec names no network namespace: the VM gets no NIC")
            return None

        def record(r: NetworkRecord) -> None:
            self._record.network.append(r)
            self._save()

        stack.callback(self._record.network.clear)
        return await pod_network.wire(model, spec.netns_path, stack, record)

    async def _start_vm(self, stack: AsyncExitStack, size: VmSize,
                        network: pod_network.PodNetwork | None = None) -> Hypervisor:
        kind, _share = shared_storage(self.config.hypervisor)
        console = self.config.agent.debug_console_enabled
        vm = self._hypervisor_factory(self.config.hypervisor, vm_spec(
            self.config, self.id, self.state_path, self.socket_dir, size))
        await vm.add_device(SharedFsDevice(self.shared_dir, kind, SHARED_FS_TAG))
        for nic in network.devices() if network is not None else ():
            await vm.add_device(nic)
        stack.push_async_callback(vm.stop)
        self._vm = vm
        stack.callback(setattr, self, "_vm", None)
        try:
            await vm.start()
        except HypervisorRefused as e:  # the configuration forbids it: a fix is needed
            raise InvalidArgumentError(str(e)) from e
        except HypervisorError as e:
            raise UnavailableError(f"failed to start the VM of sandbox {self.id}: {e}") from e
        finally:
            if network is not None:  # the VMM has its own copies (or failed to start)
                network.close_fds()
        self._record.accelerator = vm.accelerator
        self._record.accelerator_reason = vm.accelerator_reason
        self._record.agent_address = vm.agent_address
        self._record.kernel = self.config.hypervisor.kernel
        self._record.initrd = self.config.hypervisor.initrd
        self._record.image = self.config.hypervisor.image
        self._record.processes = [
            ProcessRecord(pid=r.pid, start_time=r.start_time, role=r.role)
            for r in vm.process_records()
        ]
        self._save()
        log.info(
            "vm started sandbox=%s hypervisor=%s vmm_pid=%s accelerator=%s reason=%r",
            self.id, self.config.hypervisor.name, vm.pid, vm.accelerator,
            vm.accelerator_reason,
        )
        if console:  # a root shell into the pod's VM: never enabled silently
            log.warning("debug console enabled: a root shell in the guest for kata-runtime "
                        "exec", extra=kv(sandbox=self.id, namespace=self.namespace,
                                         config=str(self.config.path),
                                         key="agent.kata.debug_console_enabled"))
        return vm

    async def _hand_over(self, agent: AgentApi) -> None:
        """A VM restored from a template (or taken from the VM cache) has the template's
        (or the cached VM's) clock, RNG state and size until now: set, reseed, and online
        what the driver hot-plugged for this pod's size."""
        guest = Guest(lambda: agent)  # self.guest waits for RUNNING
        # Independent calls, sent at once: each guest round trip is dear under TCG.
        steps = [asyncio.ensure_future(step) for step in (
            guest.hand_over(), guest.online_cpus(self.vcpus),
            guest.online_memory(self.memory_mib))]
        try:
            _, vcpus, memory = await asyncio.gather(*steps)
        except BaseException:
            for step in steps:
                step.cancel()
            await asyncio.gather(*steps, return_exceptions=True)
            raise
        log.info("VM booted ahead (VM template or VM cache) handed over: guest clock set, "
                 "RNG reseeded, %d vCPUs and %d MiB online", vcpus, memory)

    async def _connect_agent(self, vm: Hypervisor, stack: AsyncExitStack) -> AgentApi:
        timeout = self.config.agent.dial_timeout
        connect = asyncio.ensure_future(self._agent_connector(vm.agent_address, timeout))
        died = asyncio.ensure_future(vm.wait_exited())
        try:
            await asyncio.wait({connect, died}, return_when=asyncio.FIRST_COMPLETED)
            if connect.done() and connect.exception() is not None:
                # A VM going down resets the agent's connection before its exit is seen.
                await asyncio.wait({died}, timeout=VM_EXIT_GRACE)
        except BaseException:  # cancelled: a connection made meanwhile must not leak
            await self._abandon(connect)
            raise
        finally:
            died.cancel()
        if died.done() and not died.cancelled():
            await self._abandon(connect)
            raise UnavailableError(
                f"failed to connect to the agent of sandbox {self.id}: the VM exited while "
                f"booting; see {self.console_log}{self._console_tail()}"
            )
        try:
            agent = connect.result()
        except (TimeoutError, AgentCallError, OSError) as e:
            raise UnavailableError(
                f"failed to connect to the agent of sandbox {self.id} within {timeout:.0f}s "
                f"({bounded(str(e))}); see {self.console_log}{self._console_tail()}"
            ) from e
        stack.push_async_callback(agent.close)
        self._agent = agent
        stack.callback(setattr, self, "_agent", None)
        return agent

    @staticmethod
    async def _abandon(connect: asyncio.Future[AgentApi]) -> None:
        """Stop dialling; close the connection if it was made after all."""
        connect.cancel()
        with contextlib.suppress(BaseException):
            await connect
        if connect.done() and not connect.cancelled() and connect.exception() is None:
            await connect.result().close()

    def _console_tail(self, lines: int = 5) -> str:
        try:
            text = self.console_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        # Guest output: untrusted, so bounded like any other guest text.
        return (": ..." + bounded(" | ".join(text[-lines:]), 1024)) if text else ""

    def _save(self) -> None:
        self._record.containers = sorted(self._shares)
        write_record(self.state_path, self._record)

    async def _supervise(self, vm: Hypervisor, agent: AgentApi) -> None:
        """Watch a running sandbox: a VMM that exits (or kills itself because a helper
        died), an agent connection that ends (a guest breaking the protocol is one that can
        no longer be trusted) or an agent that stops answering ends the sandbox at once, so
        every process gets its exit (255) and nothing waits on a dead VM."""
        exited = asyncio.ensure_future(vm.wait_exited())
        health = asyncio.ensure_future(self._watch_agent(agent))
        closed = asyncio.ensure_future(agent.wait_closed())
        watches = {exited, health, closed}
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watch in watches:
                watch.cancel()
        if exited in done and not exited.cancelled() and exited.exception() is None:
            why = f"the VM exited (status {exited.result()})"
        elif closed in done:
            why = "the agent connection ended (the guest closed it or broke the protocol)"
        else:
            why = "the agent stopped answering"
        log.error("sandbox %s: %s: tearing it down", self.id, why)
        try:
            await self.stop(graceful=False)
        except SandboxError as e:
            log.error("sandbox %s: %s", self.id, e)

    async def _watch_agent(self, agent: AgentApi) -> None:
        """Return once the agent has failed :data:`HEALTH_FAILURES` checks in a row."""
        failures = 0
        while failures < HEALTH_FAILURES:
            await asyncio.sleep(HEALTH_INTERVAL)
            try:
                await agent.health_check(HEALTH_TIMEOUT)
                failures = 0
            except (AgentCallError, OSError, TimeoutError) as e:
                failures += 1
                log.warning("sandbox %s: agent health check %d/%d failed: %s", self.id,
                            failures, HEALTH_FAILURES, e)  # fmt: skip

    async def stop(self, graceful: bool = True) -> None:
        """Stop everything (idempotent): agent, VM, mounts, state dir. ``graceful=False``
        (the VM or agent is gone) skips asking the agent to tidy up."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        async with self._lock:
            after = self._step(SandboxOp.STOP)
            undo, self._undo = self._undo, None
            if undo is None:
                self.state = after
                return
            self.state = after
            try:
                if self._agent is not None and graceful:
                    with contextlib.suppress(AgentCallError, OSError, asyncio.TimeoutError):
                        await self._agent.destroy_sandbox()
                self._shares.clear()
                await undo.aclose()
            except (OSError, HypervisorError) as e:
                raise UnavailableError(f"failed to stop sandbox {self.id} cleanly: {e}") from e
            finally:
                self.state = self._step(SandboxOp.STOPPED)

    def host_processes(self) -> list[ProcessRecord]:
        """The VMM (role ``vmm``) and its helpers while the VM runs."""
        if self._vm is None:
            return []
        return [ProcessRecord(r.pid, r.start_time, r.role) for r in self._vm.process_records()]

    def _agent_or_raise(self) -> AgentApi:
        self._step(SandboxOp.USE)
        if self._agent is None:
            raise UnavailableError(f"sandbox {self.id} has no agent connection")
        return self._agent

    # container storage
    @staticmethod
    def _container_dir(container_id: str) -> str:
        """A container's directory, relative to ``mounts_dir``."""
        return f"containers/{container_id}"

    async def create_container(self, c: ContainerConfig) -> None:
        """Mount the rootfs into the share and create the container in the guest."""
        cid = validate_id("container", c.container_id)
        agent = self._agent_or_raise()
        if cid in self._shares:
            raise AlreadyExistsError(f"container {cid} already exists in sandbox {self.id}")
        spec, binds = spec_for_guest(c.spec, cid)
        self._shares.add(cid)
        try:
            await in_thread(self._mount_rootfs, c, binds)
            self._save()
            async with agent_errors(f"create container {cid}"):
                await agent.create_container(cid, spec, c.terminal, c.stdin)
        except BaseException as e:  # cancelled too: the share goes with the container
            await self._unshare(cid)
            if isinstance(e, OSError):
                kind = ResourceExhaustedError if e.errno == errno.ENOSPC else UnavailableError
                raise kind(f"failed to create container {cid}: {e}") from e
            raise

    def _mount_rootfs(self, c: ContainerConfig, binds: list[SharedBind]) -> None:
        """The rootfs and the bind-mount sources, under the container's share (or nothing)."""
        base = self._container_dir(c.container_id)
        what = "the rootfs"
        try:
            if c.rootfs:
                storage.mount_rootfs(c.rootfs, self.mounts_dir, f"{base}/rootfs")
            else:
                root = c.spec.get("root", {}).get("path", "rootfs")
                source = Path(root) if Path(root).is_absolute() else c.bundle / root
                storage.bind_path(source, self.mounts_dir, f"{base}/rootfs", readonly=False)
            for bind in binds:
                what = f"bind mount source {bind.source}"
                storage.bind_path(Path(bind.source), self.mounts_dir,
                                  f"{base}/mounts/{bind.name}", bind.readonly)
        except OSError as e:
            storage.unmount_tree(self.mounts_dir / base)
            storage.remove_tree(self.mounts_dir / base)
            raise InvalidArgumentError(
                f"failed to share {what} of container {c.container_id}: {e}"
            ) from e

    async def _unshare(self, container_id: str) -> None:
        directory = self.mounts_dir / self._container_dir(container_id)
        await in_thread(storage.unmount_tree, directory)
        await in_thread(storage.remove_tree, directory)
        self._shares.discard(container_id)
        if self.state_path.exists():
            try:
                self._save()
            except OSError as e:  # only the listing is stale; nothing stays mounted
                log.warning("sandbox %s: failed to update %s: %s", self.id, self.state_path, e)

    async def remove_container(self, container_id: str) -> None:
        """Stop what is left of the container in the guest and unmount its rootfs."""
        if container_id not in self._shares:
            raise NotFoundError(f"container {container_id} not found in sandbox {self.id}")
        try:
            async with agent_errors(f"remove container {container_id}"):
                await self._agent_or_raise().remove_container(container_id)
        except NotFoundError:
            pass  # the guest never had it or already forgot it
        finally:
            await self._unshare(container_id)
