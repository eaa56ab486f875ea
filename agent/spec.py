"""Rewrite the OCI spec the host sent into the one crun runs in the guest.

Theory of operation
-------------------
The host already made ``root.path`` a guest path. The agent owns what only the guest can
decide, and enforces what must never come from the host:

* ``root.path`` must stay under the agent's run dir (``/run/kata-containers``);
* ``linux.cgroupsPath`` is ``<cgroup_parent>/<cid>`` (``/kata/<cid>``) or absent when
  cgroups are disabled (host tests on cgroup v1);
* namespaces carrying a ``path`` point into the *host*: dropped (the guest has its own);
  the ``network`` namespace is dropped too: containers share the VM's network;
* hooks are host programs: removed;
* ``process.terminal`` follows the request (crun then demands a console socket).

Pure functions on dicts, so they are unit-tested without crun.
"""

from __future__ import annotations

import json
from typing import Any

from agent.errors import InvalidArgument
from agent.validate import check_guest_path


def parse_json_object(field: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{field} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be a JSON object")
    return value


def rewrite_spec(
    spec: dict[str, Any],
    container_id: str,
    run_dir: str,
    cgroup_parent: str | None,
    terminal: bool,
) -> dict[str, Any]:
    """A copy of ``spec`` fit for ``crun create`` in the guest (see module docstring)."""
    spec = json.loads(json.dumps(spec))  # deep copy; the input stays as the host sent it
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise InvalidArgument("oci spec has no root.path")
    root["path"] = check_guest_path("root.path", root["path"], run_dir)
    process = spec.get("process")
    if not isinstance(process, dict) or not process.get("args"):
        raise InvalidArgument("oci spec has no process.args")
    process["terminal"] = terminal
    spec.pop("hooks", None)
    linux = spec.setdefault("linux", {})
    if not isinstance(linux, dict):
        raise InvalidArgument("oci spec linux must be an object")
    linux["namespaces"] = [
        ns
        for ns in linux.get("namespaces") or []
        if isinstance(ns, dict) and not ns.get("path") and ns.get("type") != "network"
    ]
    if cgroup_parent:
        linux["cgroupsPath"] = f"{cgroup_parent.rstrip('/')}/{container_id}"
    else:
        linux.pop("cgroupsPath", None)
    return spec


def check_process(process: dict[str, Any]) -> dict[str, Any]:
    """An exec's OCI Process: it must at least name a program."""
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("process.args must be a non-empty list of strings")
    if "cwd" not in process:
        process["cwd"] = "/"  # crun requires it; the OCI default
    return process
