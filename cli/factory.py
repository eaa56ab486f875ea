"""``kata-runtime factory init|status|destroy``: the VM template pods are restored from.

``init`` boots one VM as a pod's would be, waits for its agent and saves it at
``[factory] template_path`` (replacing one that is there), printing what it made; pods use
it only when ``enable_template = true``. ``status`` says whether a pod's VM would be
restored from it, and if not why (exit 1 then). ``destroy`` removes it (exit 0 also when
there was none). ``--json`` prints the same as JSON. Run as root: the template is guest
memory every pod would run, so its directory is root's, 0700.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from sandbox import template
from sandbox.config import RuntimeConfig
from sandbox.errors import SandboxError

PROG = "kata-runtime"
ACTIONS = ("init", "status", "destroy")


def add_arguments(sub: argparse.ArgumentParser) -> None:
    """The sub-command's arguments."""
    sub.add_argument("action", choices=ACTIONS,
                     help="init: make (or remake) the template; status: is it usable; "
                          "destroy: remove it")
    sub.add_argument("--json", action="store_true", help="print JSON")


def run(config: RuntimeConfig, args: argparse.Namespace) -> int:
    """Do the action; the exit code."""
    try:
        if args.action == "init":
            doc = asyncio.run(template.make(config))
            return _print(doc, args.json, _made(doc))
        if args.action == "status":
            doc = template.status(config)
            _print(doc, args.json, _status(doc))
            return 0 if doc["usable"] else 1
        removed = template.destroy(config)
        doc = {"path": str(config.factory.template_path), "removed": removed}
        return _print(doc, args.json, f"VM template {doc['path']} "
                      f"{'removed' if removed else 'was not there'}")
    except (SandboxError, OSError) as e:
        sys.stderr.write(f"{PROG}: factory {args.action}: {e}\n")
        return 1


def _print(doc: dict[str, Any], as_json: bool, text: str) -> int:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if as_json else text + "\n")
    return 0


def _made(doc: dict[str, Any]) -> str:
    text = (f"VM template saved in {doc['path']}: booted in {doc['boot_seconds']} s, saved in "
            f"{doc['save_seconds']} s, {doc['state_mib']} MiB of state")
    if not doc["enabled"]:
        text += "; pods use it once [factory] enable_template = true"
    return text


def _status(doc: dict[str, Any]) -> str:
    state = "on" if doc["enabled"] else "off (enable_template = false)"
    usable = "usable" if doc["usable"] else f"not usable: {doc['reason']}"
    return f"VM templates: {state}\ntemplate {doc['path']}: {usable}"
