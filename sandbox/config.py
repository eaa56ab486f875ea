"""Loading configuration.toml (Kata's section and key names) into typed settings.

Lookup order, first hit wins: the runtime options' ``ConfigPath`` (containerd passes it to
the shim), ``$KATA_CONF_FILE``, ``/etc/kata-containers/configuration.toml``,
``/usr/share/defaults/kata-containers/configuration.toml``. A shim started under a variant
name, ``containerd-shim-kata-<variant>-v2`` (containerd's binary for the runtime type
``io.containerd.kata-<variant>.v2``: ``kata-qemu``, ``kata-qemu-microvm``,
``kata-stratovirt``), reads ``configuration-<variant>.toml`` instead, from beside
``$KATA_CONF_FILE`` or the two default directories; ConfigPath still wins.

Loading checks types only; file paths (kernel, initrd, VMM) are checked when a sandbox
starts, so that ``shim delete`` can always read ``state_dir`` and clean up, even under a
broken configuration.

The hypervisor is whichever single ``[hypervisor.<name>]`` section the file has
(`hypervisors.factory`). Keys this version does not know, and keys it parses but does not
act on while they are set, are not fatal: they become `RuntimeConfig.warnings`, each naming
the key, the file and its line, which the shim logs at start-up and ``kata-runtime check``
shows. A security setting is never silently ignored that way.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.constants import DEFAULT_STATE_DIR, DEFAULT_TEMPLATE_DIR
from hypervisors.config import ConfigError
from hypervisors.factory import parse_hypervisor
from sandbox.errors import InvalidArgumentError

if TYPE_CHECKING:  # only a type here; `shim start`/`delete` load this module
    from hypervisors.base import HypervisorConfig

DEFAULT_PATHS = (
    Path("/etc/kata-containers/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/configuration.toml"),
)
CONFIG_ENV = "KATA_CONF_FILE"
#: ``containerd-shim-kata-<variant>-v2``: the shim of runtime ``io.containerd.kata-<variant>.v2``.
VARIANT_BINARY = re.compile(r"containerd-shim-kata-([a-z0-9][a-z0-9-]*)-v2")
#: Tables this version reads, with the keys it knows in each.
AGENT_KEYS = frozenset({"dial_timeout", "kernel_modules", "debug_console_enabled"})
RUNTIME_KEYS = frozenset({"enable_debug", "state_dir", "internetworking_model",
                          "static_sandbox_resource_mgmt", "static_sandbox_base_memory",
                          "sandbox_cgroup_only"})
#: The VM cache's socket in the state dir unless ``vm_cache_endpoint`` says otherwise.
VM_CACHE_SOCKET = "vm-cache.sock"
MAX_VM_CACHE = 64
#: sun_path holds 107 bytes; the cache's VMs' sockets go in ``<endpoint>.d/vm-N/``.
MAX_ENDPOINT = 80
FACTORY_KEYS = frozenset({"enable_template", "template_path", "vm_cache_number",
                          "vm_cache_endpoint"})
MIN_BASE_MEMORY_MIB = 64
TOP_TABLES = frozenset({"hypervisor", "agent", "runtime", "factory"})
INTERNETWORKING_MODELS = ("tcfilter", "macvtap", "none")


class ConfigNotFoundError(InvalidArgumentError):
    """No configuration file was given and none exists at the default paths."""


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent.kata]`` table."""

    dial_timeout: float = 90.0
    kernel_modules: tuple[str, ...] = ()
    #: A root shell in the guest for ``kata-runtime exec`` (security.md): off by default.
    debug_console_enabled: bool = False


@dataclass(frozen=True)
class FactoryConfig:
    """The ``[factory]`` table: VMs restored from a saved template (`sandbox.template`)."""

    enable_template: bool = False
    template_path: Path = Path(DEFAULT_TEMPLATE_DIR)
    #: VMs `kata-runtime factory init` keeps booted for pods (0: no VM cache).
    vm_cache_number: int = 0
    #: The VM cache's socket; None: ``<state_dir>/vm-cache.sock``.
    vm_cache_endpoint: Path | None = None

    @property
    def template_dir(self) -> Path | None:
        """Where pods look for the template; None when templates are off."""
        return self.template_path if self.enable_template else None

    def cache_endpoint(self, state_dir: Path) -> Path:
        """The VM cache's socket, configured or under ``state_dir``."""
        return self.vm_cache_endpoint or state_dir / VM_CACHE_SOCKET


@dataclass(frozen=True)
class RuntimeConfig:
    """The whole configuration a sandbox runs with."""

    path: Path
    hypervisor: HypervisorConfig
    agent: AgentConfig
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    enable_debug: bool = False
    internetworking_model: str = "tcfilter"
    #: Size the VM from the pod's limits (sandbox/sizing.py); base MiB for the guest itself.
    static_sandbox_resource_mgmt: bool = False
    static_sandbox_base_memory: int = 256
    #: Run the VMM and virtiofsd in the pod's cgroup on the host (hostos/cgroups.py).
    sandbox_cgroup_only: bool = False
    factory: FactoryConfig = FactoryConfig()
    #: Unknown keys and set-but-unsupported keys, one message each (file and line).
    warnings: tuple[str, ...] = ()


def variant_of(program: str) -> str:
    """The runtime variant a shim binary's name selects: ``containerd-shim-kata-qemu-v2``
    (what containerd runs for ``io.containerd.kata-qemu.v2``) -> ``qemu``; '' for
    ``containerd-shim-kata-v2`` or any other name."""
    m = VARIANT_BINARY.fullmatch(os.path.basename(program))
    return m.group(1) if m else ""


def variant_paths(variant: str) -> tuple[Path, ...]:
    """Where a variant's ``configuration-<variant>.toml`` may be: beside $KATA_CONF_FILE
    (the default runtime's file), then the default directories."""
    name = f"configuration-{variant}.toml"
    env = os.environ.get(CONFIG_ENV)
    dirs = ([Path(env).parent] if env else []) + [p.parent for p in DEFAULT_PATHS]
    return tuple(d / name for d in dirs)


def find_config(config_path: str | None = None, variant: str = "") -> Path:
    """The configuration file to use, following the lookup order above; a runtime
    `variant` (the shim's name, `variant_of`) looks for its own file first."""
    if config_path:
        return Path(config_path)
    if variant:
        candidates = variant_paths(variant)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            tried = ", ".join(str(p) for p in candidates)
            raise ConfigNotFoundError(
                f"failed to find the configuration of runtime variant {variant!r}: tried "
                f"{tried}; run `make install`, or set ConfigPath in the runtime options")
        return found
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(p) for p in DEFAULT_PATHS)
    raise ConfigNotFoundError(
        f"failed to find configuration.toml: tried {tried}; set ConfigPath in the runtime "
        f"options, set ${CONFIG_ENV}, or run `make install`"
    )


def load_config(config_path: str | None = None, variant: str = "") -> RuntimeConfig:
    """Read and parse the configuration; raise InvalidArgumentError naming file and key."""
    path = find_config(config_path, variant)
    try:
        text = path.read_text(encoding="utf-8")
        doc = tomllib.loads(text)
    except OSError as e:
        raise InvalidArgumentError(f"failed to read configuration {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"failed to parse configuration {path}: {e}") from e
    try:
        return _parse(path, doc, text)
    except ConfigError as e:
        raise InvalidArgumentError(str(e)) from e


def _parse(path: Path, doc: Mapping[str, Any], text: str) -> RuntimeConfig:
    source = str(path)
    hypervisor = parse_hypervisor(_table(doc, "hypervisor", path), source)
    agent_table = _table(_table(doc, "agent", path), "kata", path)
    runtime = _table(doc, "runtime", path)
    config = RuntimeConfig(
        path=path,
        hypervisor=hypervisor,
        agent=AgentConfig(
            dial_timeout=float(_typed(agent_table, "dial_timeout", (int, float), 90.0, path)),
            kernel_modules=tuple(_typed(agent_table, "kernel_modules", list, [], path)),
            debug_console_enabled=bool(
                _typed(agent_table, "debug_console_enabled", bool, False, path)),
        ),
        state_dir=Path(_typed(runtime, "state_dir", str, DEFAULT_STATE_DIR, path)),
        enable_debug=bool(_typed(runtime, "enable_debug", bool, False, path)),
        internetworking_model=_choice(
            runtime, "internetworking_model", INTERNETWORKING_MODELS, path
        ),
        static_sandbox_resource_mgmt=bool(
            _typed(runtime, "static_sandbox_resource_mgmt", bool, False, path)),
        static_sandbox_base_memory=_base_memory(runtime, path),
        sandbox_cgroup_only=bool(_typed(runtime, "sandbox_cgroup_only", bool, False, path)),
        factory=_factory(_table(doc, "factory", path), path),
    )
    return _with_warnings(config, doc, text, agent_table, runtime)


def _factory(table: Mapping[str, Any], path: Path) -> FactoryConfig:
    template_path = str(_typed(table, "template_path", str, DEFAULT_TEMPLATE_DIR, path))
    if not os.path.isabs(template_path):
        raise InvalidArgumentError(f"template_path in {path} is {template_path!r}: give an "
                                   "absolute path (a directory only root can write)")
    endpoint = table.get("vm_cache_endpoint")
    if endpoint is not None and (not isinstance(endpoint, str) or not os.path.isabs(endpoint)
                                 or len(endpoint) > MAX_ENDPOINT):
        raise InvalidArgumentError(f"vm_cache_endpoint in {path} is {endpoint!r}: give an "
                                   f"absolute path of at most {MAX_ENDPOINT} characters (a "
                                   "unix socket, in a directory only root can write)")
    count = int(_typed(table, "vm_cache_number", int, 0, path))
    if not 0 <= count <= MAX_VM_CACHE:
        raise InvalidArgumentError(f"vm_cache_number in {path} is {count}: give 0 (no VM "
                                   f"cache) to {MAX_VM_CACHE}")
    return FactoryConfig(
        enable_template=bool(_typed(table, "enable_template", bool, False, path)),
        template_path=Path(template_path), vm_cache_number=count,
        vm_cache_endpoint=Path(endpoint) if endpoint else None)


def _with_warnings(
    config: RuntimeConfig, doc: Mapping[str, Any], text: str,
    agent: Mapping[str, Any], runtime: Mapping[str, Any],
) -> RuntimeConfig:
    section = f"hypervisor.{config.hypervisor.name}"
    unknown: list[tuple[str, str | None]] = [(t, None) for t in sorted(doc.keys() - TOP_TABLES)]
    unknown += [("agent", t) for t in sorted(_table(doc, "agent", config.path).keys() - {"kata"})]
    unknown += [(section, k) for k in config.hypervisor.unknown_keys]
    unknown += [("agent.kata", k) for k in sorted(agent.keys() - AGENT_KEYS)]
    unknown += [("runtime", k) for k in sorted(runtime.keys() - RUNTIME_KEYS)]
    factory = _table(doc, "factory", config.path)
    unknown += [("factory", k) for k in sorted(factory.keys() - FACTORY_KEYS)]
    unsupported = [(section, k, "this version does not act on it, so it has no effect")
                   for k in config.hypervisor.unsupported_keys]  # fmt: skip
    if config.agent.kernel_modules:
        unsupported.append(("agent.kata", "kernel_modules", "the guest loads only the modules "
                            "built into its image"))  # fmt: skip
    where = config.path
    warnings = [f"unknown {_name(t, k)} in {where}{_line(text, t, k)}: ignored; check the "
                "spelling against configuration.toml's documentation" for t, k in unknown]
    warnings += [f"{t}.{k} in {where}{_line(text, t, k)} is set but not supported: {why}"
                 for t, k, why in unsupported]  # fmt: skip
    return dataclasses.replace(config, warnings=tuple(warnings))


def _name(table: str, key: str | None) -> str:
    return f"table [{table}]" if key is None else f"key {table}.{key}"


def _line(text: str, table: str, key: str | None) -> str:
    """``:<n>``, the line where ``key`` of ``[table]`` (or the table itself) is written."""
    current = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        header = re.match(r"^\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1).replace(" ", "").replace('"', "")
            if key is None and (current == table or current.startswith(table + ".")):
                return f":{number}"
        elif key is not None and current == table and re.match(
            rf"^\"?{re.escape(key)}\"?\s*=", line
        ):
            return f":{number}"
    return ""


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


def _base_memory(runtime: Mapping[str, Any], path: Path) -> int:
    value = int(_typed(runtime, "static_sandbox_base_memory", int, 256, path))
    if value < MIN_BASE_MEMORY_MIB:
        raise InvalidArgumentError(
            f"static_sandbox_base_memory in {path} is {value}: give at least "
            f"{MIN_BASE_MEMORY_MIB} (MiB for the guest kernel and agent)")
    return value


def _choice(table: Mapping[str, Any], key: str, choices: tuple[str, ...], path: Path) -> str:
    value = _typed(table, key, str, choices[0], path)
    if value not in choices:
        raise InvalidArgumentError(
            f"{key} in {path} is {value!r}: use one of {', '.join(choices)}"
        )
    return str(value)
