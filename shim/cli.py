"""kata-runtime: the operator CLI (check, list, env, exec, metrics).

Not implemented yet: every command says so and exits 1, rather than pretending to work.
``--version`` works; no command or an unknown one is a usage error (exit 2).
"""

from __future__ import annotations

import sys

from shim import VERSION

COMMANDS = {
    "check": "check that this host can run VM-isolated containers",
    "list": "list sandboxes and their VMs",
    "env": "show the configuration in use",
    "exec": "run a command in a sandbox's VM",
    "metrics": "show a sandbox's metrics",
}


def usage() -> str:
    """The usage text."""
    lines = ["usage: kata-runtime [--version] <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-v", "--version", "version"):
        print(f"kata-runtime {VERSION}")
        return 0
    if args and args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not args or args[0] not in COMMANDS:
        problem = "missing command" if not args else f"unknown command {args[0]!r}"
        sys.stderr.write(f"kata-runtime: {problem}\n{usage()}\n")
        return 2
    sys.stderr.write(f"kata-runtime: failed to run {args[0]}: not implemented yet\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
