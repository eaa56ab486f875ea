"""The VM cache's wire: what a shim and the cache daemon (`hypervisors.qemu.vmcache`) say.

Pure: messages in, bytes out, and back, with no I/O, so every bound is unit-tested.

One connection per claim, root-only unix socket, one JSON object per line:

1. shim -> ``{"op": "describe"}``; cache -> ``{"ok": true, "vm": {...}}``, the shape every
   cached VM has (`hypervisors.qemu.template.Template`'s fields), for the shim to check
   that its pod fits, or ``{"ok": false, "error": "..."}``;
2. shim -> ``{"op": "claim", "sandbox": "<id>"}``; cache -> ``{"ok": true, "pid": ...,
   "start_time": ..., "dir": ..., "accelerator": ..., "reason": ...}`` with, as fds
   (SCM_RIGHTS), the owner socket of the VM's holder (`kata-vm-holder`, hostos/holder.c:
   the VM lives as long as the shim holds it, and its exit status arrives on it) and the
   guest console's connection; or an error when no VM is ready. The connection then ends.

``kata-runtime factory status`` sends ``describe`` alone (the reply also has ``ready``,
``count`` and ``claimed``); ``factory destroy`` sends ``{"op": "stop"}``, answered
``{"ok": true}`` before the cache stops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: A message longer than this is refused: a claim's reply is ~300 bytes, a describe ~2 KiB.
MAX_LINE = 64 * 1024


class WireError(ValueError):
    """A message that is not one of the cache's, and why."""


@dataclass(frozen=True)
class Claimed:
    """A cached VM handed to a shim."""

    pid: int
    start_time: int
    #: The VM's directory in the cache: its sockets are moved out of it by the shim.
    dir: str
    accelerator: str
    reason: str


def encode(message: dict[str, Any]) -> bytes:
    """One line."""
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise WireError(f"a VM cache message of {len(line)} bytes is over {MAX_LINE}")
    return line


def split_line(buffer: bytes) -> tuple[bytes | None, bytes]:
    """The first complete line of ``buffer`` and the rest; (None, buffer) until a line is
    complete. `WireError` once more than `MAX_LINE` bytes came without a newline."""
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > MAX_LINE:
            raise WireError(f"a VM cache message is over {MAX_LINE} bytes")
        return None, buffer
    if end + 1 > MAX_LINE:
        raise WireError(f"a VM cache message is over {MAX_LINE} bytes")
    return buffer[:end], buffer[end + 1:]


def decode(line: bytes) -> dict[str, Any]:
    """A line as a JSON object."""
    try:
        message = json.loads(line)
    except ValueError as e:
        raise WireError(f"a VM cache message is not JSON: {e}") from e
    if not isinstance(message, dict):
        raise WireError("a VM cache message is not a JSON object")
    return message


def request_op(message: dict[str, Any]) -> tuple[str, str]:
    """(op, sandbox id) of a request; the id is '' but for ``claim``. ``stop`` (from
    ``kata-runtime factory destroy``) makes the cache stop its idle VMs and exit."""
    op = message.get("op")
    if op in ("describe", "stop"):
        return op, ""
    if op == "claim":
        sandbox = message.get("sandbox")
        if not isinstance(sandbox, str) or not 0 < len(sandbox) <= 256:
            raise WireError("a VM cache claim names no sandbox")
        return "claim", sandbox
    raise WireError(f"unknown VM cache request {str(op)[:40]!r}")


def reply_error(message: dict[str, Any]) -> str | None:
    """The error a reply carries; None when it says ``ok``."""
    if message.get("ok") is True:
        return None
    error = message.get("error")
    return str(error)[:500] if error else "the VM cache refused without saying why"


def claimed(message: dict[str, Any]) -> Claimed:
    """A claim's ``ok`` reply, checked field by field."""
    try:
        result = Claimed(pid=message["pid"], start_time=message["start_time"],
                         dir=message["dir"], accelerator=message["accelerator"],
                         reason=message["reason"])
    except KeyError as e:
        raise WireError(f"a VM cache claim reply has no {e.args[0]!r}") from e
    ints_ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                  for v in (result.pid, result.start_time))
    strs_ok = all(isinstance(v, str) for v in (result.dir, result.accelerator, result.reason))
    if not ints_ok or not strs_ok or result.accelerator not in ("kvm", "tcg"):
        raise WireError("a VM cache claim reply has a field of the wrong type")
    return result
