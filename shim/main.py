"""Entry point of containerd-shim-kata-v2: flags, then start, delete or the daemon.

containerd reads ``start``'s stdout and stderr together as the address, so ``start`` prints
only the address on success (its log lines go to the bundle's ``log`` FIFO) and only the
error on failure. ``delete`` prints a serialized DeleteResponse; its stderr is logged by
containerd. Usage errors exit 2, as Go's flag package does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sandbox.errors import SandboxError
from shim import log as shimlog
from shim import manager
from shim.flags import Flags, UsageError, parse, usage

PROGRAM = "containerd-shim-kata-v2"


def version_text() -> str:
    """What ``-v`` prints: the same as ``kata-runtime version`` (sandbox/versioninfo.py), for
    the configuration this shim's name selects. Imported here: only ``-v`` pays for it."""
    from sandbox.config import variant_of
    from sandbox.versioninfo import version_text as text

    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    name = argv0 if variant_of(argv0) else PROGRAM
    return text(name, None, variant_of(argv0))


def main(argv: list[str] | None = None) -> int:
    """Run the shim; the process exit code."""
    try:
        flags = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write(f"{e}\n{usage(PROGRAM)}\n")
        return 2
    if flags.help:
        sys.stderr.write(usage(PROGRAM) + "\n")
        return 0
    if flags.version:
        sys.stdout.write(version_text())
        return 0
    if flags.action == "start":
        return _start(flags)
    if flags.action == "delete":
        return _delete(flags)
    if flags.daemon:
        from shim import daemon  # imports the whole sandbox stack: only the daemon needs it

        return daemon.run(flags)
    sys.stderr.write(f"missing action: start or delete\n{usage(PROGRAM)}\n")
    return 2


def _read_options() -> bytes:
    """The runtime options Any containerd writes to stdin (nothing from a terminal)."""
    if os.isatty(0):
        return b""
    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError):
        return b""


def _start(flags: Flags) -> int:
    shimlog.setup_daemon(Path.cwd(), flags.debug, container=flags.id, namespace=flags.namespace)
    try:
        address = manager.start(flags, _read_options())
    except (SandboxError, OSError) as e:
        sys.stderr.write(f"failed to start shim: {e}\n")
        return 1
    sys.stdout.write(address)
    return 0


def _delete(flags: Flags) -> int:
    shimlog.setup_stderr(flags.debug, container=flags.id, namespace=flags.namespace)
    try:
        response = manager.delete(flags)
    except (SandboxError, OSError) as e:
        sys.stderr.write(f"failed to delete {flags.id}: {e}\n")
        return 1
    sys.stdout.buffer.write(response)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
