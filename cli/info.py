"""`kata-runtime env`: the settings in use (`kata-runtime list` is cli/listing.py).

`env` prints the resolved configuration (every field as parsed, defaults included) and a
few facts about this runtime, as TOML-like ``key = value`` tables or as JSON.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any, TextIO

from common.constants import RUNTIME_VERSION
from sandbox.config import RuntimeConfig
from sandbox.inspect import settings


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
