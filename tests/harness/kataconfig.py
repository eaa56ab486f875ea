"""Test configurations for containerd-shim-kata-v2 (a copy of configuration.toml with
overrides), written to a file that containerd exports to its shims as KATA_CONF_FILE."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configuration.toml"
GUEST_DIR = REPO / "build" / "out"
Overrides = Mapping[str, Mapping[str, Any]]  # {"hypervisor.qemu": {"kernel": "/x"}}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Write `{"a.b": {"key": value}}` as TOML tables (scalars and lists only)."""
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {_value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """{"hypervisor": {"qemu": {...}}} -> {"hypervisor.qemu": {...}}."""
    tables: dict[str, dict[str, Any]] = {}
    scalars = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    if scalars and prefix:
        tables[prefix] = scalars
    for k, v in doc.items():
        if isinstance(v, dict):
            tables.update(flatten(v, f"{prefix}.{k}" if prefix else k))
    return tables


def overrides_for_tests(state_dir: Path, guest_dir: Path = GUEST_DIR,
                   memory_mib: int = 512) -> dict[str, dict[str, Any]]:
    return {
        "hypervisor.qemu": {"kernel": str(guest_dir / "vmlinuz"),
                            "initrd": str(guest_dir / "initrd.img"),
                            "default_memory": memory_mib,
                            # These machines have no usable KVM (docs: environment.md).
                            "allow_tcg": True},
        "runtime": {"state_dir": str(state_dir), "enable_debug": True},
    }


def write(path: Path, *overrides: Overrides, base: Path = DEFAULT_CONFIG) -> Path:
    """Copy `base` with `overrides` applied (later ones win) to `path`; checks it parses."""
    tables = flatten(tomllib.loads(base.read_text()))
    for ov in overrides:
        for name, values in ov.items():
            tables.setdefault(name, {}).update(values)
    text = dumps(tables)
    tomllib.loads(text)
    path.write_text(text)
    return path
