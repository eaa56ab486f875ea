"""Loading configuration.toml (Kata's section and key names) into typed settings.

Lookup order, first hit wins: the runtime options' ``ConfigPath`` (containerd passes it to
the shim), ``$KATA_CONF_FILE``, ``/etc/kata-containers/configuration.toml``,
``/usr/share/defaults/kata-containers/configuration.toml``. Loading checks types only; file
paths (kernel, initrd, QEMU) are checked when a sandbox starts, so that ``shim delete`` can
always read ``state_dir`` and clean up, even under a broken configuration.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisors.config import ConfigError, QemuConfig
from sandbox.errors import InvalidArgumentError

DEFAULT_PATHS = (
    Path("/etc/kata-containers/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/configuration.toml"),
)
CONFIG_ENV = "KATA_CONF_FILE"


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent.kata]`` table."""

    dial_timeout: float = 90.0
    kernel_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeConfig:
    """The whole configuration a sandbox runs with."""

    path: Path
    qemu: QemuConfig
    agent: AgentConfig
    state_dir: Path = Path("/run/kata-py")
    enable_debug: bool = False


def find_config(config_path: str | None = None) -> Path:
    """The configuration file to use, following the lookup order above."""
    if config_path:
        return Path(config_path)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(p) for p in DEFAULT_PATHS)
    raise InvalidArgumentError(
        f"failed to find configuration.toml: tried {tried}; set ConfigPath in the runtime "
        f"options, set ${CONFIG_ENV}, or run `make install`"
    )


def load_config(config_path: str | None = None) -> RuntimeConfig:
    """Read and parse the configuration; raise InvalidArgumentError naming file and key."""
    path = find_config(config_path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise InvalidArgumentError(f"failed to read configuration {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgumentError(f"failed to parse configuration {path}: {e}") from e
    try:
        return _parse(path, doc)
    except ConfigError as e:
        raise InvalidArgumentError(str(e)) from e


def _parse(path: Path, doc: Mapping[str, Any]) -> RuntimeConfig:
    hypervisor = _table(doc, "hypervisor", path)
    qemu = QemuConfig.from_table(_table(hypervisor, "qemu", path), str(path), check_files=False)
    agent_table = _table(_table(doc, "agent", path), "kata", path)
    runtime = _table(doc, "runtime", path)
    return RuntimeConfig(
        path=path,
        qemu=qemu,
        agent=AgentConfig(
            dial_timeout=float(_typed(agent_table, "dial_timeout", (int, float), 90.0, path)),
            kernel_modules=tuple(_typed(agent_table, "kernel_modules", list, [], path)),
        ),
        state_dir=Path(_typed(runtime, "state_dir", str, "/run/kata-py", path)),
        enable_debug=bool(_typed(runtime, "enable_debug", bool, False, path)),
    )


def _table(doc: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(f"{key} in {path} must be a table, not {value!r}")
    return value


def _typed(
    table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any, path: Path
) -> Any:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InvalidArgumentError(f"{key} in {path} has the wrong type: {value!r}")
    return value
