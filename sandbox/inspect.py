"""What the operator CLI asks of the runtime: host checks, sandboxes on disk, settings.

The CLI (``cli/``) goes through this module only: it never imports a hypervisor package.
`host_checks` asks the configured hypervisor's driver; `list_sandboxes` reads every
``<state_dir>/sbs/<namespace>/<id>/state.json`` and checks the recorded processes against /proc (a
helper counts as alive only if its pid exists, is not a zombie and still has the recorded
start time; the shim's pid is checked with its start time too when the record has one).
A directory without a readable, valid state.json (a sandbox still starting, or debris of a
crash) is listed with the problem instead of aborting the listing.

Each entry has a ``status`` (docs/cli.md; the JSON schema is docs/kata-runtime-list.schema.json):

- ``running``: the recorded shim and VMM are alive;
- ``stale``: the shim is gone (dead, zombie or its pid reused) or the VMM is: a sandbox
  nothing serves any more, whose state waits for containerd's ``delete`` (or a crash debris);
- ``partial``: no state.json yet (starting, or left by a crash), or a record without a
  VMM yet while its shim lives (the VM is starting or stopping);
- ``invalid``: state.json is unreadable, not valid, or names another sandbox.

``problem`` says why, for every status but ``running`` ("" then).
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent_client.dial import dial_blocking
from common.constants import DEBUG_CONSOLE_VSOCK_PORT
from hostos.procs import BATCH_WRAPPER, process_state, wrapper_path
from hypervisors.base import HostCheck
from hypervisors.factory import driver
from hypervisors.statepaths import DEBUG_CONSOLE_SOCKET
from sandbox.config import RuntimeConfig
from sandbox.state import (
    STATE_FILE,
    VMM_ROLE,
    SandboxRecord,
    monitor_socket_path,
    read_record,
    sandbox_path,
    socket_dir_path,
)

STATUSES = ("running", "stale", "partial", "invalid")
#: process_state() values of a process that is no longer the one recorded.
GONE = frozenset({"dead", "zombie", "pid reused"})

__all__ = [
    "STATUSES",
    "DebugConsole",
    "HostCheck",
    "debug_console",
    "describe_sandbox",
    "dial_debug_console",
    "exec_wrapper",
    "host_checks",
    "list_sandboxes",
    "monitor_socket_path",
    "settings",
]


def host_checks(config: RuntimeConfig) -> list[HostCheck]:
    """The hypervisor driver's checks of this host for ``config``."""
    hv = config.hypervisor
    return driver(hv.name).host_checks(hv, str(config.path))


def exec_wrapper() -> str:
    """The paths of the exec wrappers helpers are spawned through (`hostos.procs`: the
    death-signal one, and ``chrt`` for a VMM under TCG); OSError if one is missing."""
    return f"{wrapper_path()}, {wrapper_path(BATCH_WRAPPER[0])}"


def describe_sandbox(path: Path, namespace: str = "") -> dict[str, Any]:
    """One sandbox directory as a JSON-ready dict, with its ``status`` and ``problem``."""
    entry: dict[str, Any] = {"id": path.name, "namespace": namespace, "path": str(path),
                             "status": "invalid", "problem": ""}  # fmt: skip
    try:
        raw = (path / STATE_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        entry.update(status="partial",
                     problem=f"partial: no {STATE_FILE} (starting, or left by a crash)")
        return entry
    except OSError as e:
        entry["problem"] = f"unreadable: {e.strerror or e}"
        return entry
    try:
        record = SandboxRecord.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        entry["problem"] = f"invalid {STATE_FILE}: {type(e).__name__}: {e}"
        return entry
    entry.update(_record_fields(record))
    if record.sandbox_id != path.name:
        entry["problem"] = f"{STATE_FILE} names sandbox {record.sandbox_id!r}"
        return entry
    entry["status"], entry["problem"] = sandbox_status(entry["shim"], entry["vmm"])
    return entry


def _record_fields(record: SandboxRecord) -> dict[str, Any]:
    """What a valid record says, with the recorded processes checked against /proc."""
    processes = [
        {"role": p.role, "pid": p.pid, "start_time": p.start_time,
         "state": process_state(p.pid, p.start_time)}
        for p in record.processes
    ]
    shim_started = record.shim_start_time or None
    return {
        "hypervisor": record.hypervisor,
        "shim": {"pid": record.shim_pid, "state": process_state(record.shim_pid, shim_started)},
        "vmm": next((p for p in processes if p["role"] == VMM_ROLE), None),
        "processes": processes,
        "accelerator": record.accelerator,
        "accelerator_reason": record.accelerator_reason,
        "guest_kernel": record.guest_kernel_release,
        "kernel": record.kernel,
        "initrd": record.initrd,
        "image": record.image,
        "containers": list(record.containers),
    }


def sandbox_status(shim: dict[str, Any], vmm: dict[str, Any] | None) -> tuple[str, str]:
    """(status, problem) of a valid record from its shim's and VMM's process states. A
    shim pid of 0 (a record that never named it) is judged by the VMM alone."""
    if shim["state"] in GONE:
        return "stale", f"stale: shim {shim['pid']} {shim['state']}"
    if vmm is not None and vmm["state"] in GONE:
        return "stale", f"stale: VMM {vmm['pid']} {vmm['state']}"
    if vmm is None:
        return "partial", "partial: no VMM recorded yet (starting or stopping)"
    return "running", ""


def _is_legacy_sandbox(path: Path) -> bool:
    """``sbs/<id>`` written before namespaces: it holds a sandbox's files itself."""
    return any((path / name).exists() for name in (STATE_FILE, "shared", "mounts"))


def list_sandboxes(state_dir: Path) -> list[dict[str, Any]]:
    """Every sandbox of ``<state_dir>/sbs/<namespace>/<id>`` (and of the older
    ``sbs/<id>``), sorted by namespace and id; [] when there is no such directory."""
    sbs = state_dir / "sbs"
    if not sbs.exists():
        return []
    entries = []
    for top in sorted(p for p in sbs.iterdir() if p.is_dir()):
        if _is_legacy_sandbox(top):
            entries.append(describe_sandbox(top))
            continue
        entries += [describe_sandbox(p, top.name)
                    for p in sorted(top.iterdir()) if p.is_dir()]  # fmt: skip
    return sorted(entries, key=lambda e: (e["namespace"], e["id"]))


def settings(config: RuntimeConfig) -> dict[str, dict[str, Any]]:
    """The configuration as tables of plain JSON values, keyed like the file's sections."""
    agent = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config.agent).items()}
    return {
        f"hypervisor.{config.hypervisor.name}": config.hypervisor.settings(),
        "agent.kata": agent,
        "runtime": {
            "state_dir": str(config.state_dir),
            "sandboxes_dir": str(config.state_dir / "sbs"),
            "enable_debug": config.enable_debug,
            "internetworking_model": config.internetworking_model,
        },
        "factory": {
            "enable_template": config.factory.enable_template,
            "template_path": str(config.factory.template_path),
        },
    }


@dataclass(frozen=True)
class DebugConsole:
    """What ``kata-runtime exec`` needs of a sandbox: whether its VM has the debug console,
    the configuration it was started with (to say where to enable it), the socket to dial."""

    enabled: bool
    config_path: str
    socket: Path
    #: Beside a vsock agent, the console's own vsock port (``vsock://<cid>:1026`` or
    #: ``hvsock://<back-end socket>:1026``); "" means `socket`.
    address: str = ""


def debug_console(state_dir: Path, namespace: str, sandbox_id: str) -> DebugConsole:
    """The debug console of ``<state_dir>/sbs/<namespace>/<id>`` as its state.json records
    it; disabled when there is no readable record."""
    record = read_record(sandbox_path(state_dir, namespace, sandbox_id))
    serial = socket_dir_path(state_dir, namespace, sandbox_id) / DEBUG_CONSOLE_SOCKET
    agent = record.agent_address if record is not None else ""
    return DebugConsole(
        enabled=record is not None and record.debug_console,
        config_path=record.config_path if record is not None else "",
        socket=serial,
        address=debug_console_address(agent),
    )


def dial_debug_console(console: DebugConsole, timeout: float) -> socket.socket:
    """A connection to the debug console (`OSError` if it does not answer)."""
    return dial_blocking(console.address or f"serial://{console.socket}", timeout)


def debug_console_address(agent_address: str) -> str:
    """The debug console beside a vsock agent: its own vsock port (the agent serves it
    there then); "" when the agent is not on vsock (the console's virtio-serial socket)."""
    if agent_address.startswith(("vsock://", "hvsock://")):
        return f"{agent_address.rpartition(':')[0]}:{DEBUG_CONSOLE_VSOCK_PORT}"
    return ""
