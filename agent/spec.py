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
* ``net.*`` sysctls are taken out: crun wants a new network namespace for them, but the
  pod's network is the VM's own, so the agent sets them on the VM (`take_net_sysctls`);
* a privileged container (CAP_SYS_ADMIN, /sys read-write) gets the guest's devices, as
  runc gives it the host's: the host sent none (`is_privileged`, `grant_guest_devices`);
* hooks are host programs: removed;
* ``linux.personality`` is ``{"domain": "LINUX"}`` unless the host sent one: crun may run
  without address-space randomisation (agent.crun), which its children inherit, and crun
  sets a named execution domain, flags cleared, before it execs the container's init and
  every exec, so the container's processes are randomised again;
* ``process.terminal`` follows the request (crun then demands a console socket).

Pure functions on dicts, so they are unit-tested without crun.
"""

from __future__ import annotations

import json
import re
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
    if not isinstance(linux.get("personality"), dict):
        linux["personality"] = {"domain": "LINUX"}
    linux["namespaces"] = guest_namespaces(linux.get("namespaces"), sandbox_pid,
                                           pod_sandbox_id(spec))
    if cgroup_parent:
        linux["cgroupsPath"] = f"{cgroup_parent.rstrip('/')}/{container_id}"
    else:
        linux.pop("cgroupsPath", None)
    return spec


SYSCTL_NAME = re.compile(r"[a-z0-9_]+(\.[a-z0-9_\-]+)+")
MAX_SYSCTL_VALUE = 4096


def take_net_sysctls(spec: dict[str, Any]) -> dict[str, str]:
    """Remove the ``net.*`` sysctls from ``spec`` (already a copy) and return them, checked:
    the pod's network namespace is the VM's, so the agent writes them there itself."""
    linux = spec.get("linux")
    sysctls = linux.get("sysctl") if isinstance(linux, dict) else None
    if not isinstance(sysctls, dict):
        return {}
    taken = {}
    for name in [n for n in sysctls if isinstance(n, str) and n.startswith("net.")]:
        value = sysctls.pop(name)
        if not SYSCTL_NAME.fullmatch(name) or not isinstance(value, str) \
                or len(value) > MAX_SYSCTL_VALUE:
            raise InvalidArgument(f"invalid sysctl {name!r}")
        taken[name] = value
    return taken


# The agent's own channel (virtio-serial ports): never handed to a container.
AGENT_DEVICE_PREFIXES = ("vport",)


def is_privileged(spec: dict[str, Any]) -> bool:
    """What CRI's privileged mode leaves in a spec when the runtime handler takes no host
    devices (``privileged_without_host_devices``): CAP_SYS_ADMIN in the bounding set and
    /sys mounted read-write (every other container gets it read-only)."""
    caps = _field(_field(spec, "process", dict), "capabilities", dict)
    sysfs_rw = any(isinstance(m, dict) and m.get("destination") == "/sys"
                   and m.get("type") == "sysfs" and "ro" not in _field(m, "options", list)
                   for m in _field(spec, "mounts", list))
    return sysfs_rw and "CAP_SYS_ADMIN" in _field(caps, "bounding", list)


def grant_guest_devices(spec: dict[str, Any], devices: list[dict[str, Any]]) -> None:
    """Give a privileged container the guest's devices and every device in its cgroup, as
    runc's privileged mode does with the host's."""
    linux = spec.setdefault("linux", {})
    linux["devices"] = devices
    resources = linux.setdefault("resources", {})
    if isinstance(resources, dict):
        resources["devices"] = [{"allow": True, "access": "rwm"}]


def _field(obj: Any, key: str, kind: type) -> Any:
    """obj[key] when obj is a dict and the value a `kind`, else an empty `kind`."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, kind) else kind()


def guest_devices(entries: list[tuple[str, str, int, int, int]]) -> list[dict[str, Any]]:
    """OCI ``linux.devices`` for the guest's (name, type c|b, major, minor, mode) in /dev,
    minus the agent's channel."""
    return [{"path": f"/dev/{name}", "type": kind, "major": major, "minor": minor,
             "fileMode": mode, "uid": 0, "gid": 0}
            for name, kind, major, minor, mode in sorted(entries)
            if not name.startswith(AGENT_DEVICE_PREFIXES)]


def sysctl_path(name: str) -> str:
    """/proc/sys path of a checked sysctl name (dots are separators)."""
    return "/proc/sys/" + name.replace(".", "/")


def check_process(process: dict[str, Any]) -> dict[str, Any]:
    """An exec's OCI Process: it must at least name a program."""
    args = process.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("process.args must be a non-empty list of strings")
    if "cwd" not in process:
        process["cwd"] = "/"  # crun requires it; the OCI default
    return process
