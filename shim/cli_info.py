"""`kata-runtime list` and `kata-runtime env`: what is running, and with which settings.

`list` reads every ``<state_dir>/sbs/<id>/state.json`` (see sandbox/state.py) and checks the
recorded processes against /proc: a helper counts as alive only if its pid exists, is not a
zombie and still has the recorded start time (a reused pid is reported as such). The shim's
record has no start time, so its pid is checked for existence only. A directory without a
readable, valid state.json (a sandbox still starting, or debris of a crash) is listed with
the problem instead of aborting the listing.

`env` prints the resolved configuration (every field as parsed, defaults included) and a few
facts about this runtime, as TOML-like ``key = value`` tables or as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any, TextIO

from hypervisors.procs import ProcessRecord as ProcRecord
from hypervisors.procs import is_alive, start_time
from sandbox.config import RuntimeConfig
from sandbox.state import STATE_FILE, SandboxRecord
from shim import VERSION

COLUMNS = ("ID", "SHIM", "QEMU", "ACCEL", "KERNEL", "CONTAINERS", "PROBLEM")


def process_state(pid: int, started: int | None) -> str:
    """``alive``, ``dead``, ``zombie`` or ``pid reused``; without a start time, pid only."""
    if pid <= 0:
        return "none"
    now = start_time(pid)
    if now is None:
        return "dead"
    if started is None:
        return "alive"
    if now != started:
        return "pid reused"
    return "alive" if is_alive(ProcRecord(pid, started, "")) else "zombie"


def describe_sandbox(path: Path) -> dict[str, Any]:
    """One sandbox directory as a JSON-ready dict; ``problem`` is set when it is not usable."""
    entry: dict[str, Any] = {"id": path.name, "path": str(path), "problem": ""}
    try:
        raw = (path / STATE_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        entry["problem"] = f"partial: no {STATE_FILE} (starting, or left by a crash)"
        return entry
    except OSError as e:
        entry["problem"] = f"unreadable: {e.strerror or e}"
        return entry
    try:
        record = SandboxRecord.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        entry["problem"] = f"invalid {STATE_FILE}: {type(e).__name__}: {e}"
        return entry
    processes = [
        {"role": p.role, "pid": p.pid, "start_time": p.start_time,
         "state": process_state(p.pid, p.start_time)}
        for p in record.processes
    ]
    qemu = next((p for p in processes if p["role"] == "qemu"), None)
    entry.update(
        shim={"pid": record.shim_pid, "state": process_state(record.shim_pid, None)},
        qemu=qemu,
        processes=processes,
        accelerator=record.accelerator,
        accelerator_reason=record.accelerator_reason,
        guest_kernel=record.guest_kernel_release,
        containers=list(record.containers),
    )
    if record.sandbox_id != path.name:
        entry["problem"] = f"state.json names sandbox {record.sandbox_id!r}"
    return entry


def list_sandboxes(state_dir: Path) -> list[dict[str, Any]]:
    """Every entry of ``<state_dir>/sbs``, sorted by id; [] when there is no such directory."""
    sbs = state_dir / "sbs"
    if not sbs.exists():
        return []
    return [describe_sandbox(p) for p in sorted(sbs.iterdir()) if p.is_dir()]


def _proc_cell(proc: dict[str, Any] | None) -> str:
    return "-" if not proc else f"{proc['pid']} {proc['state']}"


def format_table(entries: list[dict[str, Any]]) -> str:
    """A fixed-width table, one row per sandbox."""
    rows = [list(COLUMNS)]
    for e in entries:
        rows.append([
            e["id"], _proc_cell(e.get("shim")), _proc_cell(e.get("qemu")),
            e.get("accelerator") or "-", e.get("guest_kernel") or "-",
            ",".join(e.get("containers") or []) or "-", e["problem"] or "-",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in rows
    )


def run_list(config: RuntimeConfig, as_json: bool, out: TextIO | None = None) -> int:
    """Print the sandboxes; 1 only if the state directory itself cannot be read."""
    out = out or sys.stdout
    try:
        entries = list_sandboxes(config.state_dir)
    except OSError as e:
        sys.stderr.write(
            f"kata-runtime: failed to list {config.state_dir / 'sbs'}: {e.strerror or e} "
            "(run as root?)\n"
        )
        return 1
    if as_json:
        out.write(json.dumps(entries, indent=2) + "\n")
    elif entries:
        out.write(format_table(entries) + "\n")
    else:
        out.write(f"no sandboxes in {config.state_dir / 'sbs'}\n")
    return 0


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def env_doc(config: RuntimeConfig) -> dict[str, dict[str, Any]]:
    """The configuration and runtime facts, as tables of plain JSON values."""
    qemu = {k: _plain(v) for k, v in dataclasses.asdict(config.qemu).items()}
    return {
        "meta": {
            "version": VERSION,
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "config_path": str(config.path),
        },
        "hypervisor.qemu": qemu,
        "agent.kata": {k: _plain(v) for k, v in dataclasses.asdict(config.agent).items()},
        "runtime": {
            "state_dir": str(config.state_dir),
            "sandboxes_dir": str(config.state_dir / "sbs"),
            "enable_debug": config.enable_debug,
        },
    }


def format_env(doc: dict[str, dict[str, Any]]) -> str:
    """TOML-like tables; values are JSON literals (valid TOML for these types)."""
    lines: list[str] = []
    for table, values in doc.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def run_env(config: RuntimeConfig, as_json: bool, out: TextIO | None = None) -> int:
    """Print the environment (to stdout by default)."""
    out = out or sys.stdout
    doc = env_doc(config)
    out.write(json.dumps(doc, indent=2) + "\n" if as_json else format_env(doc))
    return 0
