"""The on-disk record of one sandbox: what a crashed shim's `delete` needs to clean up.

Lives at ``<state_dir>/sbs/<sandbox-id>/state.json``, replaced atomically on every change.
Nothing needed for cleanup is kept only in memory.

Format versions: 2 names the hypervisor and the containerd namespace and calls the VMM's
process role ``vmm``. A record without a version (written before hypervisors were
pluggable, in ``sbs/<id>`` without a namespace) is read as QEMU's, its ``qemu`` role as
``vmm``, so a shim upgraded under running pods still cleans them up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
SOCKET_DIGEST = 20
MONITOR_SOCKET = "shim-monitor.sock"
FORMAT_VERSION = 2
VMM_ROLE = "vmm"
_LEGACY_ROLES = {"qemu": VMM_ROLE}


def sandbox_path(state_dir: Path, namespace: str, sandbox_id: str) -> Path:
    """The directory holding everything of one sandbox: the same id in two containerd
    namespaces is two sandboxes, as with runc."""
    return state_dir / "sbs" / namespace / sandbox_id


def socket_dir_path(state_dir: Path, namespace: str, sandbox_id: str) -> Path:
    """Where a sandbox's VM keeps its unix sockets: ``<state_dir>/sk/<digest>``, short
    enough for sun_path (107 bytes) whatever the namespace and id (a CRI id is 64 chars)."""
    digest = hashlib.sha256(f"{namespace}/{sandbox_id}".encode()).hexdigest()[:SOCKET_DIGEST]
    return state_dir / "sk" / digest


def boot_slots_path(state_dir: Path) -> Path:
    """The host's boot slots (`hostos.slots`), shared by every sandbox of ``state_dir``."""
    return state_dir / "boot-slots"


def monitor_socket_path(state_dir: Path, namespace: str, sandbox_id: str) -> Path:
    """The shim's metrics endpoint (HTTP on a unix socket): beside the VM's sockets, since
    a path in the sandbox dir can pass sun_path's limit with a CRI id."""
    return socket_dir_path(state_dir, namespace, sandbox_id) / MONITOR_SOCKET


def remove_socket_dir(path: Path) -> None:
    """Remove a sandbox's socket dir (it holds sockets only), and ``sk`` once empty."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path):
            if not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
        path.rmdir()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def remove_namespace_dir_if_empty(path: Path) -> None:
    """After a sandbox dir went: drop its namespace dir too once it holds nothing."""
    parent = path.parent
    if parent.parent.name == "sbs":
        with contextlib.suppress(OSError):  # not empty (another sandbox), or gone already
            parent.rmdir()


def make_sandbox_dir(path: Path) -> None:
    """Create a sandbox's dir (and its namespace dir), racing a concurrent removal of an
    empty namespace dir; FileExistsError if the sandbox dir exists."""
    for _ in range(5):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
            return
        except FileNotFoundError:
            continue  # the namespace dir was just removed as empty: make it again
    path.mkdir(mode=0o700)


def legacy_sandbox_path(state_dir: Path, sandbox_id: str) -> Path:
    """Where a shim from before namespaces kept a sandbox (no namespace in the path)."""
    return state_dir / "sbs" / sandbox_id


@dataclass
class ProcessRecord:
    """A host process of the sandbox (vmm, virtiofsd), identified by pid and start time."""

    pid: int
    start_time: int
    role: str


@dataclass
class NetworkRecord:
    """One pod interface we wired: the tap or macvtap we made beside it in its netns."""

    netns_path: str
    model: str
    interface: str
    tap: str


@dataclass
class SandboxRecord:
    """What is persisted about a sandbox."""

    sandbox_id: str
    version: int = FORMAT_VERSION
    namespace: str = ""
    hypervisor: str = ""
    shim_pid: int = 0
    #: With shim_pid: tells a live shim from a reused pid.
    shim_start_time: int = 0
    accelerator: str = ""
    accelerator_reason: str = ""
    guest_kernel_release: str = ""
    #: The configuration file the sandbox was started with, and whether its VM has the
    #: debug console (``kata-runtime exec`` reads both).
    config_path: str = ""
    debug_console: bool = False
    #: Where the agent was reached (``serial://``, ``vsock://`` or ``hvsock://``): the debug
    #: console is beside it (`sandbox.inspect.debug_console`). "" in older records.
    agent_address: str = ""
    #: The guest kernel, initrd and root image the VM booted (after the pod's annotations);
    #: "" in records written before they were kept (and image "" without one).
    kernel: str = ""
    initrd: str = ""
    image: str = ""
    processes: list[ProcessRecord] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    #: Host cgroup directories made for the VMM and virtiofsd (removed at the end).
    host_cgroups: list[str] = field(default_factory=list)
    #: Taps and macvtaps made in the pod's netns (removed at the end, or after a crash).
    network: list[NetworkRecord] = field(default_factory=list)

    @property
    def vmm(self) -> ProcessRecord | None:
        """The VMM's record, if it was started."""
        return next((p for p in self.processes if p.role == VMM_ROLE), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SandboxRecord:
        """Parse what ``to_json`` wrote; unknown keys are ignored."""
        legacy = "version" not in doc
        roles = _LEGACY_ROLES if legacy else {}
        procs = [
            ProcessRecord(int(p["pid"]), int(p["start_time"]),
                          roles.get(str(p["role"]), str(p["role"])))
            for p in doc.get("processes", [])
        ]  # fmt: skip
        return cls(
            sandbox_id=str(doc["sandbox_id"]),
            version=FORMAT_VERSION,
            namespace=str(doc.get("namespace", "")),
            hypervisor=str(doc.get("hypervisor", "qemu" if legacy else "")),
            shim_pid=int(doc.get("shim_pid", 0)),
            shim_start_time=int(doc.get("shim_start_time", 0)),
            accelerator=str(doc.get("accelerator", "")),
            accelerator_reason=str(doc.get("accelerator_reason", "")),
            guest_kernel_release=str(doc.get("guest_kernel_release", "")),
            config_path=str(doc.get("config_path", "")),
            debug_console=doc.get("debug_console") is True,
            agent_address=str(doc.get("agent_address", "")),
            kernel=str(doc.get("kernel", "")),
            initrd=str(doc.get("initrd", "")),
            image=str(doc.get("image", "")),
            processes=procs,
            containers=[str(c) for c in doc.get("containers", [])],
            host_cgroups=[str(d) for d in doc.get("host_cgroups", [])],
            network=[NetworkRecord(str(n["netns_path"]), str(n["model"]), str(n["interface"]),
                                   str(n["tap"]))
                     for n in doc.get("network", [])],
        )


def write_record(path: Path, record: SandboxRecord) -> None:
    """Atomically replace ``path/state.json``."""
    tmp = path / (STATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / STATE_FILE)


def read_record(path: Path) -> SandboxRecord | None:
    """The record in ``path``, or None if there is none or it is unreadable."""
    try:
        with open(path / STATE_FILE, encoding="utf-8") as f:
            return SandboxRecord.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return None
