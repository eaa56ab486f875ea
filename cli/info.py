"""`kata-runtime list` and `kata-runtime env`: what is running, and with which settings.

`list` prints `sandbox.inspect.list_sandboxes` (sandboxes on disk, with live/dead/reused
process states) as a table or JSON. `env` prints the resolved configuration (every field
as parsed, defaults included) and a few facts about this runtime, as TOML-like
``key = value`` tables or as JSON.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, TextIO

from common.constants import RUNTIME_VERSION
from sandbox.config import RuntimeConfig
from sandbox.inspect import list_sandboxes, settings

COLUMNS = ("NAMESPACE", "ID", "HYPERVISOR", "SHIM", "VMM", "ACCEL", "KERNEL", "CONTAINERS",
           "PROBLEM")


def _proc_cell(proc: dict[str, Any] | None) -> str:
    return "-" if not proc else f"{proc['pid']} {proc['state']}"


def format_table(entries: list[dict[str, Any]]) -> str:
    """A fixed-width table, one row per sandbox."""
    rows = [list(COLUMNS)]
    for e in entries:
        rows.append([
            e.get("namespace") or "-", e["id"], e.get("hypervisor") or "-",
            _proc_cell(e.get("shim")), _proc_cell(e.get("vmm")), e.get("accelerator") or "-",
            e.get("guest_kernel") or "-",
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


def env_doc(config: RuntimeConfig) -> dict[str, dict[str, Any]]:
    """The configuration and runtime facts, as tables of plain JSON values."""
    return {
        "meta": {
            "version": RUNTIME_VERSION,
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "config_path": str(config.path),
            "warnings": list(config.warnings),
        },
        **settings(config),
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
