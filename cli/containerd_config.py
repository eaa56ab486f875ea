"""`kata-runtime containerd-config add|remove|show`: the CRI runtime handler in containerd's
configuration.

The handler is one block of TOML between two marker comments, appended to the file:

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
      runtime_type = "io.containerd.kata.v2"
      ...

TOML lets a table be defined anywhere in a file, once, so the block can sit at the end of
any version-2 configuration without rewriting what the operator wrote. `add` replaces an
earlier block of ours (idempotent: the same input gives the same file, and an unchanged file
is not rewritten), `remove` takes it out again. Before a file changes, its previous content
is kept in ``<file>.kata-backup``. The text functions here do no IO; `run` does.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
DEFAULT_HANDLER = "kata"
RUNTIME_TYPE = "io.containerd.kata.v2"
POD_ANNOTATIONS = ("io.katacontainers.*",)
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
BACKUP_SUFFIX = ".kata-backup"
HANDLER_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS label, as RuntimeClass


class ConfigEditError(Exception):
    """The containerd configuration cannot be changed safely; the message says why."""


@dataclass(frozen=True)
class Handler:
    name: str = DEFAULT_HANDLER
    kata_config: str = ""  # options.ConfigPath; "" = the shim's own lookup

    def __post_init__(self) -> None:
        if not HANDLER_NAME.fullmatch(self.name):
            raise ConfigEditError(f"handler name {self.name!r} is not a DNS label (lower-case "
                                  "letters, digits and '-'): RuntimeClass handlers must be")
        if self.kata_config and not self.kata_config.startswith("/"):
            raise ConfigEditError(f"--kata-config {self.kata_config!r}: give an absolute path")


def _markers(name: str) -> tuple[str, str]:
    return (f"# >>> containerd-shim-kata-v2: CRI runtime handler {name!r} "
            "(kata-runtime containerd-config; edits inside are replaced)",
            f"# <<< containerd-shim-kata-v2: CRI runtime handler {name!r}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def handler_block(handler: Handler, with_default_runc: bool = False) -> str:
    """The TOML block of one handler, markers included. `with_default_runc` adds the runc
    runtime containerd has built in: defining any runtime replaces containerd's built-in
    list, and CRI refuses to load when its default runtime ("runc") is then missing."""
    runtimes = f'plugins."{CRI_PLUGIN}".containerd.runtimes'
    table = f"{runtimes}.{handler.name}"
    begin, end = _markers(handler.name)
    lines = [begin]
    if with_default_runc:
        lines += ["# containerd's built-in default, which a runtimes table would otherwise hide",
                  f"[{runtimes}.runc]", '  runtime_type = "io.containerd.runc.v2"']
    lines += [f"[{table}]",
             f"  runtime_type = {_quote(RUNTIME_TYPE)}",
             f"  pod_annotations = [{', '.join(_quote(a) for a in POD_ANNOTATIONS)}]",
             "  privileged_without_host_devices = true"]
    if handler.kata_config:
        lines += [f"[{table}.options]", f"  ConfigPath = {_quote(handler.kata_config)}"]
    return "\n".join([*lines, end]) + "\n"


def _parse(text: str, what: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigEditError(f"{what} is not valid TOML ({e}); fix it first") from e


def _table(doc: dict[str, object], keys: tuple[str, ...]) -> dict[str, object]:
    """The table at ``keys`` in a parsed document ({} where a key is missing or no table)."""
    node: object = doc
    for key in keys:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


#: Where CRI keeps its runtime handlers, by configuration version (1: containerd 1.x's old
#: format; 2: 1.x; 3: 2.x).
RUNTIMES_TABLES = {1: ("plugins", "cri", "containerd", "runtimes"),
                   2: ("plugins", CRI_PLUGIN, "containerd", "runtimes"),
                   3: ("plugins", "io.containerd.cri.v1.runtime", "containerd", "runtimes")}
#: ``io.containerd.kata.v2`` and the variants' ``io.containerd.kata-<variant>.v2``.
KATA_RUNTIME_TYPE = re.compile(r"io\.containerd\.kata(-[a-z0-9][a-z0-9-]*)?\.v2")


def kata_handlers(doc: dict[str, object]) -> list[tuple[str, str]]:
    """(handler name, runtime_type) of every CRI runtime handler in a parsed containerd
    configuration whose runtime_type is ours, in the file's order."""
    version = doc.get("version", 1)
    keys = RUNTIMES_TABLES.get(version if isinstance(version, int) else 1, RUNTIMES_TABLES[2])
    found = []
    for name, table in _table(doc, keys).items():
        kind = table.get("runtime_type") if isinstance(table, dict) else None
        if isinstance(kind, str) and KATA_RUNTIME_TYPE.fullmatch(kind):
            found.append((name, kind))
    return found


def parse_file(path: Path) -> dict[str, object]:
    """A containerd configuration file, parsed; OSError or ConfigEditError."""
    return _parse(path.read_text(), str(path))


def _needs_default_runc(doc: dict[str, object]) -> bool:
    containerd = _table(doc, ("plugins", CRI_PLUGIN, "containerd"))
    default = containerd.get("default_runtime_name", "runc")
    return default == "runc" and "runc" not in _table(containerd, ("runtimes",))


def strip_block(text: str, name: str) -> str:
    """`text` without our block for handler `name` (unchanged when there is none)."""
    begin, end = _markers(name)
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == begin]
    if not starts:
        return text
    first = starts[0]
    stops = [i for i, line in enumerate(lines) if i > first and line.rstrip("\n") == end]
    if not stops:
        raise ConfigEditError(f"the block of handler {name!r} has its start marker but no end "
                              f"marker ({end!r}); restore the file from its backup or fix it")
    rest = lines[:first] + lines[stops[0] + 1:]
    if first == len(rest) and rest and rest[-1] == "\n":  # the blank line `add` put before it
        rest.pop()
    return "".join(rest)


def add(text: str, handler: Handler, what: str = "the configuration") -> str:
    """`text` with the handler block (replacing an earlier one of ours)."""
    base = strip_block(text, handler.name)
    doc = _parse(base, what)
    version = doc.get("version")
    if base.strip() and version != 2:
        raise ConfigEditError(
            f"{what} is containerd configuration version {version or 1}: this command writes "
            "version 2: convert the file first (containerd 1.7+: `containerd config migrate`), "
            "or add `version = 2` at its top if it has no plugin sections yet")
    if handler.name in _table(doc, RUNTIMES_TABLES[2]):
        raise ConfigEditError(f"{what} already defines the runtime handler {handler.name!r} "
                              "outside our block: remove it, or choose another --handler")
    head = base if base.strip() else "version = 2\n"
    if not head.endswith("\n"):
        head += "\n"
    result = head + "\n" + handler_block(handler, _needs_default_runc(doc))
    _parse(result, "the result")  # never write a file containerd cannot read
    return result


def remove(text: str, name: str) -> str:
    return strip_block(text, name)


def write_with_backup(path: Path, old: str | None, new: str) -> bool:
    """Replace `path` by `new` atomically, keeping `old` in the backup; False if unchanged."""
    if old == new:
        return False
    if old is not None:
        Path(str(path) + BACKUP_SUFFIX).write_text(old)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    if old is not None:
        os.chmod(tmp, path.stat().st_mode & 0o7777)
    tmp.replace(path)
    return True


def run(action: str, file: str, handler: Handler) -> int:
    """The CLI command; prints what it did, returns the exit code."""
    path = Path(file)
    try:
        old = path.read_text() if path.exists() else None
        if action == "show":
            sys.stdout.write(handler_block(handler))
            return 0
        new = (add(old or "", handler, str(path)) if action == "add"
               else remove(old or "", handler.name))
        nothing_to_remove = old is None and action == "remove"
        changed = not nothing_to_remove and write_with_backup(path, old, new)
    except (ConfigEditError, OSError) as e:
        sys.stderr.write(f"kata-runtime: containerd-config {action}: {e}\n")
        return 1
    verb = {"add": "added", "remove": "removed"}[action]
    if changed:
        backup = f" (previous content in {path}{BACKUP_SUFFIX})" if old is not None else ""
        print(f"{verb} runtime handler {handler.name!r} in {path}{backup}; "
              "restart containerd to apply it")
    else:
        print(f"{path}: nothing to change (handler {handler.name!r} already "
              f"{'present' if action == 'add' else 'absent'})")
    return 0
