"""The crun command line, run through the agent's reaper.

Theory of operation
-------------------
Every crun invocation is ``crun --root <root> [--cgroup-manager=disabled] --log
file:<log> --log-format json <command> ...`` spawned with :meth:`Reaper.spawn`. The stdio
we hand ``crun create``/``crun exec`` is inherited by the container process, so crun's own
diagnostics cannot be told apart on stderr; they are read back from the JSON log file
instead, and the last ``error`` line becomes the message of a failed call (for example
``executable file `/no/such` not found in $PATH: No such file or directory``, which crun
reports at *create* time, not at start).

Under TCG every start of crun is translated anew when its code lands at new addresses, which
cost ~70 ms per call here; with ``fixed_layout`` crun starts without address-space
randomisation (``crun --version`` 0.10 -> 0.03 s in the guest), and the container's own
processes get it back from crun (agent.spec).

``cgroups=False`` exists for hosts whose cgroup setup crun refuses (cgroup v1 hybrid);
in the guest init mounts cgroup2 and crun manages ``/kata/<cid>`` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

from agent.errors import AgentError, InvalidArgument
from agent.reaper import Reaper
from agent.syscalls import children_without_aslr


# The agent's records are NamedTuples, not frozen dataclasses: defining a dataclass compiles
# its methods (~1 ms each on the host, ~20 ms under TCG), paid on every guest's start-up.
class CrunConfig(NamedTuple):
    binary: str = "/usr/bin/crun"
    root: str = "/run/crun"
    cgroups: bool = True
    #: crun itself starts without address-space randomisation (the host asks for it under
    #: TCG: ``agent.crun_no_aslr``); container processes still get it (see agent.spec).
    fixed_layout: bool = False


class CrunError(AgentError):
    """crun exited non-zero; the message is crun's own error line."""

    code = InvalidArgument.code


def last_error(log_text: str) -> str:
    """The last message crun logged at error level (or the last line if none parses)."""
    message = ""
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            message = line.strip() or message
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", None):
            message = str(entry.get("msg", message))
    return message


class Crun:
    def __init__(self, config: CrunConfig, reaper: Reaper) -> None:
        self.config = config
        self._reaper = reaper

    def argv(self, log: str, *args: str) -> list[str]:
        cfg = self.config
        global_opts = ["--root", cfg.root, f"--log=file:{log}", "--log-format=json"]
        if not cfg.cgroups:
            global_opts.append("--cgroup-manager=disabled")
        return [cfg.binary, *global_opts, *args]

    async def run(self, log: str, args: Sequence[str], stdio: tuple[int, int, int]) -> None:
        """Run one crun command to completion; raise CrunError with crun's message."""
        _remove(log)
        try:
            with children_without_aslr() if self.config.fixed_layout else contextlib.nullcontext():
                _, exited = self._reaper.spawn(self.argv(log, *args), *stdio)
        except OSError as exc:
            raise CrunError(f"cannot run {self.config.binary}: {exc.strerror}") from exc
        status = await exited
        if status != 0:
            message = last_error(_read(log)) or f"exit status {status}"
            raise CrunError(f"crun {args[0]}: {message}")
        _remove(log)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(65536)
    except OSError:
        return ""


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
