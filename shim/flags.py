"""Command-line flags of containerd-shim-kata-v2, parsed the way Go's ``flag`` package does.

Theory of operation
-------------------
containerd runs the shim as ``<shim> -namespace ns -address A -publish-binary P -id ID
[-bundle B] [-debug] start|delete`` (Go flag syntax). :func:`parse` accepts exactly what Go's
``flag`` accepts for these definitions:

- ``-name value``, ``-name=value``, ``--name value`` and ``--name=value`` for string flags;
- ``-name``, ``-name=true|false`` for boolean flags (a boolean never takes the next word);
- parsing stops at the first non-flag word (the action) or after ``--``.

Actions: ``start``, ``delete``, or none. With no action the process is the daemon, which is
only valid when ``start`` re-executed it with the internal ``-daemon`` flag and the listening
socket on fd 3. ``-sandbox-id`` and ``-config-path`` are internal too: ``start`` passes the
pod's group id and the configuration.toml path it resolved to the daemon.

Errors raise :class:`UsageError`; ``main`` prints it with the usage text and exits 2, as Go
does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

ACTIONS = ("start", "delete")


class UsageError(Exception):
    """The command line is malformed (unknown flag, missing value, unknown action)."""


@dataclass(frozen=True)
class Flags:
    """The parsed command line."""

    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    help: bool = False
    daemon: bool = False
    sandbox_id: str = ""
    config_path: str = ""
    action: str = ""


# flag name on the command line -> (Flags attribute, is boolean, help text)
_FLAGS: dict[str, tuple[str, bool, str]] = {
    "namespace": ("namespace", False, "namespace that owns the shim"),
    "address": ("address", False, "grpc address back to main containerd"),
    "publish-binary": ("publish_binary", False, "path to the binary used to publish events"),
    "id": ("id", False, "id of the task"),
    "bundle": ("bundle", False, "path to the bundle if not workdir"),
    "socket": ("socket", False, "socket path to serve (ignored: the socket is fd 3)"),
    "debug": ("debug", True, "enable debug output in logs"),
    "v": ("version", True, "show the shim version and exit"),
    "version": ("version", True, "show the shim version and exit"),
    "h": ("help", True, "show this help"),
    "help": ("help", True, "show this help"),
    "daemon": ("daemon", True, "internal: serve the task API on fd 3"),
    "sandbox-id": ("sandbox_id", False, "internal: the pod (group) id the daemon serves"),
    "config-path": ("config_path", False, "internal: configuration.toml to load"),
}

_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def usage(program: str) -> str:
    """The usage text, in the shape Go's flag package prints it."""
    lines = [f"Usage of {program}: [flags] start|delete"]
    for name, (_attr, boolean, text) in sorted(_FLAGS.items()):
        lines.append(f"  -{name}" + ("" if boolean else " string"))
        lines.append(f"    \t{text}")
    return "\n".join(lines)


def parse(argv: list[str]) -> Flags:
    """Parse ``argv`` (without the program name) into :class:`Flags`."""
    values: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            i += 1
            break
        if len(word) < 2 or not word.startswith("-"):
            break
        i = _parse_one(argv, i, values)
    rest = argv[i:]
    if rest:
        if rest[0] not in ACTIONS:
            raise UsageError(f"unknown action {rest[0]!r}: expected start or delete")
        if len(rest) > 1:
            raise UsageError(f"unexpected arguments after {rest[0]!r}: {' '.join(rest[1:])}")
        values["action"] = rest[0]
    known = {f.name for f in fields(Flags)}
    assert set(values) <= known
    return Flags(**values)  # type: ignore[arg-type]


def _parse_one(argv: list[str], i: int, values: dict[str, str | bool]) -> int:
    """Parse the flag at ``argv[i]`` into ``values``; return the index of the next word."""
    body = argv[i][2:] if argv[i].startswith("--") else argv[i][1:]
    if not body or body.startswith("-") or body.startswith("="):
        raise UsageError(f"bad flag syntax: {argv[i]}")
    name, eq, inline = body.partition("=")
    if name not in _FLAGS:
        raise UsageError(f"flag provided but not defined: -{name}")
    attr, boolean, _text = _FLAGS[name]
    if boolean:
        values[attr] = _parse_bool(name, inline) if eq else True
        return i + 1
    if eq:
        values[attr] = inline
        return i + 1
    if i + 1 >= len(argv):
        raise UsageError(f"flag needs an argument: -{name}")
    values[attr] = argv[i + 1]
    return i + 2


def _parse_bool(name: str, text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"invalid boolean value {text!r} for -{name}")


def daemon_argv(flags: Flags, sandbox_id: str, config_path: str) -> list[str]:
    """The flags ``start`` passes to the daemon it re-executes (no program name)."""
    argv = [
        "-namespace", flags.namespace,
        "-address", flags.address,
        "-publish-binary", flags.publish_binary,
        "-id", flags.id,
        "-sandbox-id", sandbox_id,
        "-daemon",
    ]  # fmt: skip
    if config_path:
        argv += ["-config-path", config_path]
    if flags.debug:
        argv.append("-debug")
    return argv
