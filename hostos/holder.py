"""A VM's holder: the parent of one VMM, alive as long as someone holds its owner socket.

The holder is a small C program, `hostos/holder.c` (``kata-vm-holder``); its comment says
what it does and says. This module only finds it and builds its command line. It sits
next to the interpreter the runtime runs on: ``make venv`` builds it into the venv's
``bin``, ``make runtime`` copies it beside the frozen bundle's ``kata-py``
(build/freeze-runtime.sh). C rather than Python because a holder lives as long as its VM:
one per cached VM, and per pod that took one (10-14 MiB of PSS as a Python process,
docs/performance.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROGRAM = "kata-vm-holder"


class HolderMissing(RuntimeError):
    """The holder program is not where the runtime looks for it."""


def holder_path() -> Path:
    """``kata-vm-holder`` beside the running interpreter (the venv's or the bundle's)."""
    path = Path(sys.executable).parent / PROGRAM
    if not path.is_file():
        raise HolderMissing(f"{path} is missing: the VM cache needs it to start VMs; "
                            "build it with `make venv` (or reinstall the package)")
    return path


def holder_argv(owner_fd: int, pass_fds: tuple[int, ...], cpu_bound: bool,
                vmm_argv: list[str]) -> list[str]:
    """The holder's command line."""
    fds = [arg for fd in pass_fds for arg in ("--pass-fd", str(fd))]
    return [str(holder_path()), "--owner-fd", str(owner_fd), *fds,
            *(["--cpu-bound"] if cpu_bound else []), "--", *vmm_argv]
