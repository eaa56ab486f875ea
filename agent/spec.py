"""Rewrite the OCI spec the host sent into the one crun runs in the guest.

Theory of operation
-------------------
The host already made ``root.path`` a guest path. The agent owns what only the guest can
decide, and enforces what must never come from the host:

* ``root.path`` must stay under the agent's run dir (``/run/kata-containers``);
* ``linux.cgroupsPath`` is ``<cgroup_parent>/<cid>`` (``/kata/<cid>``) or absent when
  cgroups are disabled (host tests on cgroup v1);
* namespaces carrying a ``path`` point into the *host*. For a container of a pod (CRI's
  ``container-type`` annotation is ``container``) the ipc, uts and pid ones are the pod's:
  they become the guest paths of the pod's sandbox container, as with runc on a host. Any
  other path is dropped (the guest has its own); the ``network`` namespace is dropped too:
  containers share the VM's network;
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


CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# OCI namespace type -> its name under /proc/<pid>/ns; the ones a pod's containers share.
POD_NAMESPACES = {"ipc": "ipc", "uts": "uts", "pid": "pid"}


def pod_sandbox_id(spec: dict[str, Any]) -> str | None:
    """The pod's sandbox container id, for a (non-sandbox) container of a CRI pod."""
    annotations = spec.get("annotations")
    if not isinstance(annotations, dict):
        return None
    if annotations.get(CONTAINER_TYPE_ANNOTATION) != "container":
        return None
    sandbox = annotations.get(SANDBOX_ID_ANNOTATION)
    return sandbox if isinstance(sandbox, str) and sandbox else None


def guest_namespaces(namespaces: Any, sandbox_pid: int | None,
                     sandbox_id: str | None) -> list[dict[str, Any]]:
    """The namespaces crun gets (see the module docstring)."""
    result = []
    for ns in namespaces or []:
        if not isinstance(ns, dict) or ns.get("type") == "network":
            continue
        if not ns.get("path"):
            result.append(ns)
            continue
        kind = ns.get("type")
        if sandbox_id is None or kind not in POD_NAMESPACES:
            continue
        if sandbox_pid is None:
            raise InvalidArgument(
                f"the {kind} namespace is the pod's, but the pod's sandbox container "
                f"{sandbox_id!r} is not running in this VM")
        result.append({"type": kind, "path": f"/proc/{sandbox_pid}/ns/{POD_NAMESPACES[kind]}"})
    return result


def rewrite_spec(
    spec: dict[str, Any],
    container_id: str,
    run_dir: str,
    cgroup_parent: str | None,
    terminal: bool,
    sandbox_pid: int | None = None,
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
    linux["namespaces"] = guest_namespaces(linux.get("namespaces"), sandbox_pid,
                                           pod_sandbox_id(spec))
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
