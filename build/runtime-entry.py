"""Entry point of the frozen host runtime (build/freeze-runtime.sh): one program, several names.

The onedir bundle holds one executable, ``kata-py``; the entry points are symlinks to it and
the name it was run by picks the program, so the Python runtime and libraries are stored once:

* ``containerd-shim-kata-v2`` and ``containerd-shim-kata-<variant>-v2`` -> the shim
  (`shim.main`; the variant name selects ``configuration-<variant>.toml``);
* ``kata-runtime`` -> the CLI (`cli.main`).

A frozen program has no ``python -m``; ``kata-py -m <module>`` stands in for it, for the
modules the runtime re-executes itself as (``sys.executable -m network.worker``) and no others.
"""

from __future__ import annotations

import importlib
import os
import sys

#: What ``-m`` may run: the processes the runtime spawns from ``sys.executable`` (the netlink
#: worker; the vsock back-end; the shim daemon when the name the shim was run by is unknown,
#: shim/manager.py).
INTERNAL_MODULES = frozenset({"network.worker", "shim.main", "hypervisors.vsock.backend"})
SHIM_PREFIX = "containerd-shim-kata"


def restore_environment() -> None:
    """Undo what PyInstaller's bootloader adds to the environment (LD_LIBRARY_PATH into the
    bundle, _PYI_*): a process we start from it (a binary log driver, the daemon) must see
    the system's libraries and start as a fresh program."""
    orig = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if orig is None:
        os.environ.pop("LD_LIBRARY_PATH", None)
    else:
        os.environ["LD_LIBRARY_PATH"] = orig
    for key in [k for k in os.environ if k.startswith("_PYI_")]:
        del os.environ[key]


def main() -> int:
    if getattr(sys, "frozen", False):
        restore_environment()
    argv = sys.argv
    if len(argv) >= 3 and argv[1] == "-m":
        if argv[2] not in INTERNAL_MODULES:
            sys.stderr.write(f"kata-py: -m {argv[2]}: not an internal module\n")
            return 2
        sys.argv = [argv[0], *argv[3:]]
        code: int = importlib.import_module(argv[2]).main()
        return code
    name = os.path.basename(argv[0]) if argv else ""
    if name.startswith(SHIM_PREFIX) and name.endswith("-v2"):
        from shim.main import main as shim_main

        return shim_main()
    if name == "kata-runtime":
        from cli.main import main as cli_main

        return cli_main()
    sys.stderr.write(f"kata-py: run as containerd-shim-kata-v2, containerd-shim-kata-<variant>-v2 "
                     f"or kata-runtime (a symlink to this program), not as {name!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
