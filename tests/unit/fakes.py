"""Fakes for unit tests: a hypervisor, an agent, their configuration, an event recorder.

`FakeHypervisor` implements `hypervisors.base.Hypervisor` with no QEMU: ``start`` spawns a
real (sleeping) process through `hostos.procs.spawn`, so tests can assert that nothing is
left. `FakeAgent` implements `agent_client.AgentApi` in memory. Both fail on demand at a
named step (``fail_at``), which is how the sandbox's unwinding is tested step by step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from agent_client import (
    AgentCallError,
    CgroupStats,
    GuestDetails,
    GuestStats,
    ProcessExit,
    StorageSpec,
)
from hostos.procs import ProcessRecord, record, spawn, terminate
from hypervisors.annotations import AnnotationError
from hypervisors.base import Device, DeviceList, HostCheck, VmSpec
from hypervisors.config import ConfigError
from hypervisors.errors import HypervisorError
from sandbox.config import AgentConfig, RuntimeConfig
from ttrpc import Code


class Injected(HypervisorError):
    """A failure a test asked for."""


@dataclass(frozen=True)
class FakeHypervisorConfig:
    """A `HypervisorConfig` for `FakeHypervisor`."""

    name: str = "fake"
    shared_fs: str = "virtio-fs"
    kernel: str = "/fake/vmlinuz"
    initrd: str = "/fake/initrd.img"
    image: str = ""
    default_vcpus: int = 1
    default_memory: int = 256
    default_maxvcpus: int = 0
    default_maxmemory: int = 0
    missing_file: str = ""
    unknown_keys: tuple[str, ...] = ()
    unsupported_keys: tuple[str, ...] = ()

    def check_files(self, source: str) -> None:
        if self.missing_file:
            raise ConfigError(f"hypervisor.{self.name}", "kernel", self.missing_file,
                              "does not exist", "run `make guest` or fix the path", source)

    def settings(self) -> dict[str, Any]:
        return {"shared_fs": self.shared_fs}

    def with_annotations(self, annotations: Mapping[str, str],
                         source: str) -> FakeHypervisorConfig:
        if any(k.startswith("io.katacontainers.config.hypervisor.") for k in annotations):
            raise AnnotationError("annotation refused by the fake")
        return self


class FakeDriver:
    name = "fake"

    def host_checks(self, config: Any, source: str) -> list[HostCheck]:
        return [HostCheck("fake", True, "ok")]


class FakeHypervisor:
    """One fake VM: a real sleeping process stands in for the VMM."""

    def __init__(self, config: FakeHypervisorConfig, vm: VmSpec,
                 fail_at: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.config = config
        self.spec = vm
        self.fail_at = fail_at
        self.devices = DeviceList()
        self.calls: list[str] = []
        self.vcpus = vm.vcpus or config.default_vcpus
        self.paused = False
        self.stop_seconds = 0.0  # a VMM slow to stop, as a loaded host's can be
        self._proc: asyncio.subprocess.Process | None = None
        self._records: list[ProcessRecord] = []

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_at:
            raise Injected(f"failed to {name}: injected")

    async def start(self) -> None:
        self._step("start")
        self.spec.state_dir.mkdir(parents=True, exist_ok=True)
        self._proc = await spawn(["sleep", "600"], self.spec.state_dir / "vmm.stderr")
        rec = record(self._proc.pid, "vmm")
        assert rec is not None
        self._records = [rec]
        if "start-after-spawn" in self.fail_at:
            await self._kill()
            raise Injected("failed to start: injected after spawn")

    async def _kill(self) -> None:
        if self._proc is not None:
            await terminate(self._proc, 1)

    async def stop(self) -> None:
        self.calls.append("stop")
        await asyncio.sleep(self.stop_seconds)
        await self._kill()
        if "stop" in self.fail_at:
            raise Injected("failed to stop: injected (the process is gone anyway)")

    async def pause(self) -> None:
        self._step("pause")
        self.paused = True

    async def resume(self) -> None:
        self._step("resume")
        self.paused = False

    async def wait_exited(self) -> int:
        assert self._proc is not None
        return await self._proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def from_template(self) -> bool:
        """Restored whenever a template is configured (the real driver checks it fits)."""
        return self._proc is not None and self.spec.template_dir is not None

    def booted(self) -> None:
        self.calls.append("booted")

    async def add_device(self, device: Device) -> None:
        self._step("add_device")
        self.devices.add(device)

    async def resize_vcpus(self, count: int) -> int:
        self._step("resize_vcpus")
        self.vcpus = count
        return count

    async def resize_memory(self, mib: int) -> int:
        self._step("resize_memory")
        return mib

    @property
    def agent_address(self) -> str:
        return f"serial://{self.spec.state_dir}/agent.sock"

    @property
    def accelerator(self) -> str:
        return "tcg" if self._proc else ""

    @property
    def accelerator_reason(self) -> str:
        return "tcg: fake" if self._proc else ""

    @property
    def console_log(self) -> Path:
        return self.spec.state_dir / "console.log"

    def process_records(self) -> list[ProcessRecord]:
        return list(self._records)


@dataclass
class FakeProc:
    """One guest process: output to hand out, stdin received, an exit to wait for."""

    stdout: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stderr: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: asyncio.Event = field(default_factory=asyncio.Event)
    exit: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    signals: list[tuple[int, bool]] = field(default_factory=list)

    def finish(self, status: int, out: bytes = b"", err: bytes = b"") -> None:
        """Write the last output, end both streams, then exit with ``status``."""
        for q, data in ((self.stdout, out), (self.stderr, err)):
            if data:
                q.put_nowait(data)
            q.put_nowait(b"")
        if not self.exit.done():
            self.exit.set_result(status)

    def lose(self) -> None:
        """The connection went: every long poll fails."""
        if not self.exit.done():
            self.exit.set_exception(AgentCallError("WaitProcess", Code.UNAVAILABLE, "closed"))
            self.exit.exception()  # a process nobody waits for must not warn at exit
        self.stdout.put_nowait(b"")
        self.stderr.put_nowait(b"")


class FakeAgent:
    """`agent_client.AgentApi` in memory; ``fail_at`` names methods that fail."""

    def __init__(self, fail_at: frozenset[str] = frozenset()) -> None:
        self.fail_at = fail_at
        self.calls: list[tuple[str, ...]] = []
        self.procs: dict[tuple[str, str], FakeProc] = {}
        self.containers: dict[str, dict[str, Any]] = {}
        self.closed = False
        self.next_pid = 100
        self.oom: set[str] = set()  # containers whose SIGKILL exit reads as an OOM kill
        self.resources: dict[str, dict[str, Any]] = {}
        self.ports: list[int] = []  # what listening_ports answers

    def proc(self, cid: str, eid: str = "") -> FakeProc:
        """The fake guest process (created on first use)."""
        return self.procs.setdefault((cid, eid), FakeProc())

    def _call(self, method: str, *args: str) -> None:
        self.calls.append((method, *args))
        if self.closed:
            raise AgentCallError(method, Code.UNAVAILABLE, "connection closed")
        if method in self.fail_at:
            raise AgentCallError(method, Code.INTERNAL, "injected")

    async def close(self) -> None:
        self.calls.append(("close",))
        self.closed = True
        for p in self.procs.values():
            p.lose()

    async def wait_closed(self) -> None:
        while not self.closed:
            await asyncio.sleep(0.01)

    async def health_check(self, timeout: float) -> None:
        if "health_check_hangs" in self.fail_at:
            await asyncio.sleep(timeout)
            raise TimeoutError("no answer")
        self._call("health_check")

    async def guest_details(self) -> GuestDetails:
        self._call("guest_details")
        return GuestDetails("6.1.0-fake", "0.1.0", 0.5, 0.2)

    async def guest_stats(self) -> GuestStats:
        self._call("guest_stats")
        if "guest_stats_hangs" in self.fail_at:
            await asyncio.sleep(3600)
        return GuestStats(256 << 20, 100 << 20, 200 << 20, 0.5, 0.25, 0.125, 42.0)

    async def create_sandbox(self, sandbox_id: str, hostname: str,
                             storages: Any) -> None:  # fmt: skip
        self._call("create_sandbox", hostname)
        self.storages: list[StorageSpec] = list(storages)

    async def update_interface(self, interface: Any) -> None:
        self._call("update_interface", interface.name, interface.mac)

    async def update_routes(self, routes: Any) -> None:
        self._call("update_routes", *[r.gateway or r.destination for r in routes])

    async def add_arp_neighbors(self, neighbours: Any) -> None:
        self._call("add_arp_neighbors", *[n.address for n in neighbours])

    async def listening_ports(self) -> list[int]:
        self._call("listening_ports")
        return list(self.ports)

    async def destroy_sandbox(self) -> None:
        self._call("destroy_sandbox")

    async def create_container(self, container_id: str, spec: dict[str, Any], terminal: bool,
                               stdin: bool) -> None:  # fmt: skip
        self._call("create_container", container_id)
        self.containers[container_id] = json.loads(json.dumps(spec))

    async def start_container(self, container_id: str) -> int:
        self._call("start_container", container_id)
        self.proc(container_id)
        self.next_pid += 1
        return self.next_pid

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any],
                           stdin: bool) -> int:  # fmt: skip
        self._call("exec_process", container_id, exec_id, json.dumps(process))
        self.proc(container_id, exec_id)
        self.next_pid += 1
        return self.next_pid

    async def signal_process(self, container_id: str, exec_id: str, signal: int,
                             all: bool = False) -> None:  # fmt: skip
        self._call("signal_process", container_id, exec_id, str(signal))
        p = self.proc(container_id, exec_id)
        p.signals.append((signal, all))
        if signal in (9, 15):
            p.finish(128 + signal)

    async def wait_process(self, container_id: str, exec_id: str) -> ProcessExit:
        self._call("wait_process", container_id, exec_id)
        status = await asyncio.shield(self.proc(container_id, exec_id).exit)
        return ProcessExit(status, oom_killed=status == 137 and container_id in self.oom)

    async def pause_container(self, container_id: str) -> None:
        self._call("pause_container", container_id)

    async def resume_container(self, container_id: str) -> None:
        self._call("resume_container", container_id)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        self._call("update_container", container_id)
        self.resources[container_id] = resources

    async def online_cpus(self, wanted: int) -> int:
        self._call("online_cpus", str(wanted))
        return wanted

    async def online_memory(self, wanted_mib: int) -> int:
        self._call("online_memory", str(wanted_mib))
        return wanted_mib

    async def set_guest_time(self, sec: int, usec: int) -> None:
        self._call("set_guest_time", str(sec), str(usec))

    async def reseed_random(self, data: bytes) -> None:
        self._call("reseed_random", data.hex())

    async def stats_container(self, container_id: str) -> CgroupStats:
        self._call("stats_container", container_id)
        return CgroupStats(cpu_stat={"usage_usec": 1500, "user_usec": 1000},
                           memory_stat={"anon": 4096, "bogus_key": 1}, memory_current=8192,
                           memory_max=0, pids_current=2)

    async def list_processes(self, container_id: str) -> list[int]:
        self._call("list_processes", container_id)
        return [1, 7]

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        self._call("remove_process", container_id, exec_id)
        if self.procs.pop((container_id, exec_id), None) is None:
            raise AgentCallError("RemoveProcess", Code.NOT_FOUND, f"{exec_id} not found")

    async def remove_container(self, container_id: str, timeout: int = 0) -> None:
        self._call("remove_container", container_id)
        if self.containers.pop(container_id, None) is None:
            raise AgentCallError("RemoveContainer", Code.NOT_FOUND, f"{container_id} not found")

    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        return await self.proc(container_id, exec_id).stdout.get()

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        return await self.proc(container_id, exec_id).stderr.get()

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.proc(container_id, exec_id).stdin += data
        return len(data)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.proc(container_id, exec_id).stdin_closed.set()

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int,
                             cols: int) -> None:  # fmt: skip
        self._call("tty_win_resize", container_id, exec_id, str(rows), str(cols))


class FakeNetworkModel:
    """`network.model.NetworkModel` over a described netns; ``fail_at`` names steps that
    fail (``scan``, ``attach:<interface>``). Queue fds are real (``/dev/null``)."""

    name = "tcfilter"

    def __init__(self, description: Any, fail_at: frozenset[str] = frozenset()) -> None:
        self.description = description
        self.fail_at = fail_at
        self.attached: list[Any] = []
        self.detached: list[str] = []

    async def scan(self, netns_path: str) -> Any:
        if "scan" in self.fail_at:
            from network.errors import NetworkConfigError
            raise NetworkConfigError(f"network namespace {netns_path} has no interface")
        return self.description

    async def attach(self, netns_path: str, interface: Any, position: int) -> Any:
        from network.errors import NetworkError
        from network.types import Endpoint

        if f"attach:{interface.name}" in self.fail_at:
            raise NetworkError("injected")
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        endpoint = Endpoint(interface, self.name, f"tap{position}_kata", (fd,),
                            (f"tap{position}_kata",))
        self.attached.append(endpoint)
        return endpoint

    async def detach(self, netns_path: str, endpoint: Any) -> None:
        self.detached.append(endpoint.tap_name)


class FakeWorld:
    """The factories a `Sandbox` takes, recording what they made; failures on demand."""

    def __init__(self) -> None:
        self.network: FakeNetworkModel | None = None
        self.vms: list[FakeHypervisor] = []
        self.agents: list[FakeAgent] = []
        self.vm_fail_at: frozenset[str] = frozenset()
        self.agent_fail_at: frozenset[str] = frozenset()
        self.connect_error: BaseException | None = None

    def hypervisor(self, config: Any, vm: VmSpec) -> FakeHypervisor:
        made = FakeHypervisor(config, vm, self.vm_fail_at)
        self.vms.append(made)
        return made

    async def connect(self, address: str, timeout: float) -> FakeAgent:
        if self.connect_error is not None:
            raise self.connect_error
        agent = FakeAgent(self.agent_fail_at)
        self.agents.append(agent)
        return agent

    @property
    def vm(self) -> FakeHypervisor:
        return self.vms[-1]

    @property
    def agent(self) -> FakeAgent:
        return self.agents[-1]


def fake_config(tmp: Path, **hypervisor: Any) -> RuntimeConfig:
    """A runtime configuration with the fake hypervisor and state under ``tmp``."""
    return RuntimeConfig(
        path=tmp / "configuration.toml", hypervisor=FakeHypervisorConfig(**hypervisor),
        agent=AgentConfig(dial_timeout=5), state_dir=tmp / "state",
    )


def fake_sandbox(tmp: Path, world: FakeWorld, sandbox_id: str = "pod", **hypervisor: Any) -> Any:
    """A real `sandbox.sandbox.Sandbox` over the fakes of ``world``."""
    from sandbox.sandbox import Sandbox

    return Sandbox(sandbox_id, fake_config(tmp, **hypervisor),
                   hypervisor_factory=world.hypervisor,  # type: ignore[arg-type]
                   agent_connector=world.connect,
                   network_model=lambda name: world.network)  # fmt: skip


class RecordingPublisher:
    """Stands in for events.Publisher: keeps (topic, message) in publish order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []

    def publish(self, event: Message) -> None:
        from shim.events import TOPICS

        self.events.append((TOPICS[type(event)], event))

    def topics(self) -> list[str]:
        return [t for t, _ in self.events]


def write_bundle(path: Path, annotations: dict[str, str] | None = None, **spec: Any) -> Path:
    """A bundle dir with a config.json."""
    path.mkdir(parents=True, exist_ok=True)
    # As containerd writes one: a network namespace without a path (a new one), not the host's.
    body = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}}
    body.update(spec)
    if annotations:
        body["annotations"] = annotations
    (path / "config.json").write_text(json.dumps(body))
    (path / "rootfs").mkdir(exist_ok=True)
    return path


def write_config(path: Path, state_dir: Path) -> Path:
    """A minimal configuration.toml."""
    path.write_text(f'[hypervisor.qemu]\n[runtime]\nstate_dir = "{state_dir}"\n')
    return path


async def drain(*tasks: asyncio.Future[Any]) -> None:
    """Cancel and await ``tasks``."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
