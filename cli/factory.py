"""``kata-runtime factory init|status|destroy``: the VM template pods are restored from,
and the VM cache pods take booted VMs from.

``init`` boots one VM as a pod's would be, waits for its agent and saves it at
``[factory] template_path`` (replacing one that is there), printing what it made; pods use
it only when ``enable_template = true``. With ``vm_cache_number`` > 0, ``init`` then runs
the VM cache in the foreground (`sandbox.vmcache`; it makes no template unless
``enable_template`` is on) until SIGTERM, SIGINT or ``destroy``, its log on stderr.
``status`` says whether a pod's VM would be restored from the template, and if not why
(exit 1 then), and how the cache is. ``destroy`` stops the cache (or, if none serves,
removes what a killed one left) and removes the template (exit 0 also when there was
none). ``--json`` prints the same as JSON. Run as root: the template is guest memory every
pod would run, so its directory is root's, 0700.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from sandbox import template, vmcache
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
            return _init(config, args.json)
        if args.action == "status":
            doc = template.status(config)
            if config.factory.vm_cache_number:
                doc["vm_cache"] = vmcache.status(config)
            _print(doc, args.json, _status(doc))
            return 0 if doc["usable"] or doc.get("vm_cache", {}).get("serving") else 1
        stopped = vmcache.stop(config)
        cleaned = not stopped and vmcache.remove_leftovers(config)
        removed = template.destroy(config)
        doc = {"path": str(config.factory.template_path), "removed": removed,
               "vm_cache_stopped": stopped, "vm_cache_leftovers_removed": cleaned}
        text = f"VM template {doc['path']} {'removed' if removed else 'was not there'}"
        if stopped:
            text += "\nVM cache asked to stop (pods that took a VM from it run on)"
        if cleaned:
            text += "\nwhat a killed VM cache left was removed (pods that took a VM run on)"
        return _print(doc, args.json, text)
    except (SandboxError, OSError) as e:
        sys.stderr.write(f"{PROG}: factory {args.action}: {e}\n")
        return 1


def _init(config: RuntimeConfig, as_json: bool) -> int:
    if config.factory.enable_template or not config.factory.vm_cache_number:
        doc = asyncio.run(template.make(config))
        _print(doc, as_json, _made(doc))
    if config.factory.vm_cache_number:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        asyncio.run(vmcache.serve(config))
    return 0


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
    text = f"VM templates: {state}\ntemplate {doc['path']}: {usable}"
    cache = doc.get("vm_cache")
    if cache is not None:
        how = (f"{cache['ready']} of {cache['vm_cache_number']} VMs ready, "
               f"{cache['claimed']} in pods" if cache["serving"] else cache["reason"])
        text += f"\nVM cache {cache['endpoint']}: {how}"
    return text
