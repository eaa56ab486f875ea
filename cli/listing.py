"""`kata-runtime list`: the sandboxes on this host, as a table, JSON or ids.

The data is `sandbox.inspect.list_sandboxes` (every sandbox directory of the configured
state dir, its processes checked against /proc, and a ``status``). The JSON is that list,
unchanged; its schema is docs/kata-runtime-list.schema.json and docs/cli.md describes it.
The default table stays narrow (one line per sandbox on a terminal); ``--all`` adds where
each VM came from: hypervisor, accelerator, guest kernel release, kernel, initrd and root
image paths.
`find_sandbox` picks one entry by id for the commands that act on one sandbox (``exec``,
``metrics``), with the same messages for both.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from sandbox.config import RuntimeConfig
from sandbox.inspect import list_sandboxes

FORMATS = ("table", "json")
Cell = Callable[[dict[str, Any]], str]


class SandboxNotFound(Exception):
    """No one sandbox has that id (in that namespace); the message says why and what to do."""


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """``<sandbox-id> [--namespace NS]``, for the commands that act on one sandbox."""
    parser.add_argument("sandbox_id", metavar="sandbox-id",
                        help="the sandbox (pod) id, as `kata-runtime list` shows it")
    parser.add_argument("--namespace", "-n", default=None,
                        help="containerd namespace of the sandbox, when the id is in several")


def find_sandbox(state_dir: Path, sandbox_id: str, namespace: str | None) -> dict[str, Any]:
    """The `list_sandboxes` entry of that id (in ``namespace`` if given); `SandboxNotFound`
    when there is none or the id is in several namespaces."""
    found = [e for e in list_sandboxes(state_dir) if e["id"] == sandbox_id
             and (namespace is None or e["namespace"] == namespace)]  # fmt: skip
    if not found:
        where = f" in namespace {namespace}" if namespace is not None else ""
        raise SandboxNotFound(f"no sandbox {sandbox_id}{where} under {state_dir / 'sbs'}; "
                              "`kata-runtime list` shows the sandboxes")  # fmt: skip
    if len(found) > 1:
        names = ", ".join(str(e["namespace"]) for e in found)
        raise SandboxNotFound(f"sandbox {sandbox_id} exists in namespaces {names}: choose one "
                              "with --namespace")  # fmt: skip
    return found[0]


def _pid(role: str) -> Cell:
    def cell(entry: dict[str, Any]) -> str:
        proc = entry.get(role)
        return str(proc["pid"]) if proc and proc["pid"] else "-"
    return cell


def _field(key: str) -> Cell:
    return lambda entry: str(entry.get(key) or "-")


def _containers(entry: dict[str, Any]) -> str:
    return str(len(entry["containers"])) if "containers" in entry else "-"


#: (header, cell) of the default table; PROBLEM, free width, is always the last column.
NARROW: tuple[tuple[str, Cell], ...] = (
    ("NAMESPACE", _field("namespace")), ("ID", _field("id")), ("STATUS", _field("status")),
    ("CONTAINERS", _containers), ("SHIM", _pid("shim")), ("VMM", _pid("vmm")),
)
#: What ``--all`` adds before PROBLEM.
WIDE: tuple[tuple[str, Cell], ...] = (
    ("HYPERVISOR", _field("hypervisor")), ("ACCEL", _field("accelerator")),
    ("RELEASE", _field("guest_kernel")), ("KERNEL", _field("kernel")),
    ("INITRD", _field("initrd")), ("IMAGE", _field("image")),
)


def columns(wide: bool) -> tuple[str, ...]:
    """The table's headers."""
    return (*(h for h, _ in NARROW + (WIDE if wide else ())), "PROBLEM")


def format_table(entries: list[dict[str, Any]], wide: bool = False) -> str:
    """A fixed-width table, one row per sandbox."""
    cells = NARROW + (WIDE if wide else ())
    rows = [list(columns(wide))]
    rows += [[cell(e) for _, cell in cells] + [e["problem"] or "-"] for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cells))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in rows
    )


def render(entries: list[dict[str, Any]], fmt: str, quiet: bool, wide: bool) -> str:
    """What `list` prints for these entries ("" for an empty quiet listing)."""
    if quiet:
        return "".join(f"{e['id']}\n" for e in entries)
    if fmt == "json":
        return json.dumps(entries, indent=2) + "\n"
    return format_table(entries, wide) + "\n"


def run(config: RuntimeConfig, fmt: str = "table", quiet: bool = False, wide: bool = False,
        out: TextIO | None = None) -> int:
    """Print the sandboxes; 1 only if the state directory itself cannot be read."""
    out = out or sys.stdout
    sbs = config.state_dir / "sbs"
    try:
        entries = list_sandboxes(config.state_dir)
    except OSError as e:
        sys.stderr.write(f"kata-runtime: failed to list {sbs}: {e.strerror or e} (run as root?)\n")
        return 1
    if not entries and fmt == "table" and not quiet:
        out.write(f"no sandboxes in {sbs}\n")
        return 0
    out.write(render(entries, fmt, quiet, wide))
    return 0
