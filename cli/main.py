"""kata-runtime: the operator CLI (check, list, env, version, containerd-config; exec, a
debug shell in the guest, in `cli.debug_console`; metrics, a pod's Prometheus text, in
`cli.metrics`; factory, the VM template, in `cli.factory`).

This module only parses arguments and dispatches: `cli.check` holds the host checks,
`cli.listing` the sandbox listing, `cli.info` the configuration dump, and
`sandbox.versioninfo` the version report the shim's ``-v`` shares (docs/cli.md).
``--config PATH`` is accepted before or after the command; without it the configuration is
looked up as the shim does (``$KATA_CONF_FILE``, then /etc, then /usr/share/defaults).
Exit codes: 0 success, 1 failure (including "not implemented yet"), 2 usage error (missing
or unknown command).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from cli import check as cli_check
from cli import containerd_config
from cli import debug_console as cli_debug_console
from cli import factory as cli_factory
from cli import info as cli_info
from cli import listing as cli_list
from cli import metrics as cli_metrics
from common import buildinfo
from sandbox.config import RuntimeConfig, load_config
from sandbox.errors import SandboxError
from sandbox.versioninfo import format_version, version_doc

PROG = "kata-runtime"
COMMANDS = {
    "check": "check that this host can run VM-isolated containers",
    "list": "list sandboxes and their VMs",
    "env": "show the configuration in use",
    "version": "show the version, the commit and the guest image (as the shim's -v does)",
    "exec": "open a root shell in a sandbox's VM (needs debug_console_enabled)",
    "metrics": "print a sandbox's metrics (Prometheus text, from its shim)",
    "containerd-config": "add or remove the CRI runtime handler in containerd's configuration",
    "factory": "make, check or remove the VM template pods are restored from",
}


def _load(args: argparse.Namespace) -> RuntimeConfig | None:
    try:
        return load_config(args.config)
    except SandboxError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return None


def _check(args: argparse.Namespace) -> int:
    return cli_check.run(args.config, as_json=args.json, containerd_file=args.containerd_config)


def _list(args: argparse.Namespace) -> int:
    config = _load(args)
    return 1 if config is None else cli_list.run(config, args.format, args.quiet, args.all)


def _version(args: argparse.Namespace) -> int:
    doc = version_doc(args.config)
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json
                     else format_version(PROG, doc))
    return 0


def _env(args: argparse.Namespace) -> int:
    config = _load(args)
    return 1 if config is None else cli_info.run_env(config, args.json)


def _exec(args: argparse.Namespace) -> int:
    config = _load(args)
    return 1 if config is None else cli_debug_console.run(config, args)


def _metrics(args: argparse.Namespace) -> int:
    config = _load(args)
    return 1 if config is None else cli_metrics.run(config, args)


def _factory(args: argparse.Namespace) -> int:
    config = _load(args)
    return 1 if config is None else cli_factory.run(config, args)


def _not_implemented(args: argparse.Namespace) -> int:
    sys.stderr.write(f"{PROG}: failed to run {args.command}: not implemented yet\n")
    return 1


def _containerd_config(args: argparse.Namespace) -> int:
    try:
        handler = containerd_config.Handler(args.handler, args.kata_config)
    except containerd_config.ConfigEditError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 2
    return containerd_config.run(args.action, args.file, handler)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check": _check,
    "list": _list,
    "env": _env,
    "version": _version,
    "exec": _exec,
    "metrics": _metrics,
    "containerd-config": _containerd_config,
    "factory": _factory,
}


def build_parser() -> argparse.ArgumentParser:
    """The parser: global options, then one sub-command."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Operator CLI of containerd-shim-kata-v2 (VM-isolated containers).",
    )
    parser.add_argument("-v", "--version", action="version",
                        version=f"{PROG} {buildinfo.version()}")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="configuration.toml to use (default: $KATA_CONF_FILE, "
                             "/etc/kata-containers/, /usr/share/defaults/kata-containers/)")
    # Sub-commands accept --config too; SUPPRESS keeps them from overwriting the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    subs = parser.add_subparsers(dest="command", metavar="<command>")
    for name, text in COMMANDS.items():
        sub = subs.add_parser(name, help=text, description=text, parents=[common])
        if name == "list":
            _list_args(sub)
        elif name in ("env", "check", "version"):
            sub.add_argument("--json", action="store_true", help="print JSON")
            if name == "check":
                sub.add_argument("--containerd-config", metavar="PATH",
                                 default=containerd_config.DEFAULT_CONTAINERD_CONFIG,
                                 help="containerd's configuration to look for our CRI runtime "
                                      "handler in (default: %(default)s)")
        elif name == "exec":
            cli_debug_console.add_arguments(sub)
        elif name == "metrics":
            cli_metrics.add_arguments(sub)
        elif name == "containerd-config":
            _containerd_config_args(sub)
        elif name == "factory":
            cli_factory.add_arguments(sub)
    return parser


def _list_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--format", choices=cli_list.FORMATS, default="table",
                     help="table (default) or json (schema: docs/kata-runtime-list.schema.json)")
    sub.add_argument("--json", dest="format", action="store_const", const="json",
                     help="the same as --format json")
    sub.add_argument("-q", "--quiet", action="store_true", help="print sandbox ids only")
    sub.add_argument("--all", action="store_true",
                     help="table: add hypervisor, accelerator, guest kernel release, kernel, "
                          "initrd and image columns")


def _containerd_config_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("action", choices=("add", "remove", "show"),
                     help="add (or update) the handler, remove it, or print its block")
    sub.add_argument("--file", default=containerd_config.DEFAULT_CONTAINERD_CONFIG,
                     help="containerd's configuration (default: %(default)s)")
    sub.add_argument("--handler", default=containerd_config.DEFAULT_HANDLER,
                     help="the CRI runtime handler name, as in a RuntimeClass "
                          "(default: %(default)s)")
    sub.add_argument("--kata-config", default="", metavar="PATH",
                     help="configuration.toml the handler's shims use (options.ConfigPath; "
                          "default: the shim's own lookup)")


def usage() -> str:
    """The full help text."""
    return build_parser().format_help()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help/--version (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        sys.stderr.write(f"{PROG}: missing command\n{parser.format_usage()}")
        return 2
    return HANDLERS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
