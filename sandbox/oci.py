"""Rewriting an OCI runtime spec from the host's view to the guest's.

What changes, and why:
- ``root.path`` points at the container's rootfs as the guest sees it through the share;
- the ``network`` namespace is dropped so containers use the VM's network (the pod's).
  Other namespaces that carry a ``path`` name host namespaces: they go to the agent as they
  are, which makes a pod's containers join their sandbox container's (agent/spec.py);
- hooks would run host binaries; AppArmor/SELinux labels and host devices mean nothing in
  the guest (the device cgroup rules stay: they name device numbers, which crun applies
  in the guest as runc does on a host);
- bind mounts of host paths (volumes, CRI's /etc/hosts and resolv.conf, ...) become
  `SharedBind`s: the host bind-mounts each source into the container's share, and the guest
  spec binds it from there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.constants import GUEST_SHARED_DIR
from sandbox.types import PodResources, SandboxSpec

#: containerd's CRI plugin (1.7+) writes the pod's limits on the sandbox container here.
SANDBOX_CPU_QUOTA_ANNOTATION = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD_ANNOTATION = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY_ANNOTATION = "io.kubernetes.cri.sandbox-memory"


def guest_rootfs(container_id: str) -> str:
    """Where the guest sees a container's rootfs."""
    return f"{GUEST_SHARED_DIR}/containers/{container_id}/rootfs"


@dataclass(frozen=True)
class SharedBind:
    """A host path a container binds: shared as ``containers/<id>/mounts/<name>``."""

    source: str
    name: str
    readonly: bool


def guest_mounts_dir(container_id: str) -> str:
    """Where the guest sees a container's shared bind-mount sources."""
    return f"{GUEST_SHARED_DIR}/containers/{container_id}/mounts"


def is_bind(mount: dict[str, Any]) -> bool:
    """Whether an OCI mount binds a host path."""
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def spec_for_guest(
    spec: dict[str, Any], container_id: str
) -> tuple[dict[str, Any], list[SharedBind]]:
    """Return the guest spec and the host paths to share for its bind mounts."""
    out = copy.deepcopy(spec)
    root = out.setdefault("root", {})
    root["path"] = guest_rootfs(container_id)
    out.pop("hooks", None)
    process = out.get("process")
    if isinstance(process, dict):
        process.pop("apparmorProfile", None)
        process.pop("selinuxLabel", None)
    linux = out.get("linux")
    if isinstance(linux, dict):
        linux["namespaces"] = [
            ns for ns in linux.get("namespaces", []) if ns.get("type") != "network"
        ]
        linux.pop("devices", None)
        linux.pop("mountLabel", None)
    binds: list[SharedBind] = []
    for m in out.get("mounts", []):
        if is_bind(m):
            name = str(len(binds))
            binds.append(SharedBind(str(m.get("source", "")), name, "ro" in m.get("options", [])))
            m["source"] = f"{guest_mounts_dir(container_id)}/{name}"
    return out, binds


def spec_annotations(spec: Mapping[str, Any]) -> dict[str, str]:
    """The spec's annotations (empty if there are none)."""
    value = spec.get("annotations") or {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _positive(value: object) -> int | None:
    try:
        number = int(str(value))
    except ValueError:
        return None
    return number if number > 0 else None


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _resources(spec: Mapping[str, Any], notes: Mapping[str, str]) -> PodResources:
    res = _table(_table(spec, "linux"), "resources")
    cpu, memory = _table(res, "cpu"), _table(res, "memory")
    return PodResources(
        cpu_quota=_positive(notes.get(SANDBOX_CPU_QUOTA_ANNOTATION, cpu.get("quota"))),
        cpu_period=_positive(notes.get(SANDBOX_CPU_PERIOD_ANNOTATION, cpu.get("period"))),
        memory_limit_bytes=_positive(notes.get(SANDBOX_MEMORY_ANNOTATION, memory.get("limit"))),
    )


def _netns_path(spec: Mapping[str, Any]) -> str:
    for ns in _table(spec, "linux").get("namespaces") or []:
        if isinstance(ns, dict) and ns.get("type") == "network":
            return str(ns.get("path") or "")
    return ""


def cpu_limit(resources: Mapping[str, Any]) -> float:
    """CPUs an OCI LinuxResources allows (quota / period); 0.0 for no limit."""
    cpu = _table(resources, "cpu")
    quota, period = _positive(cpu.get("quota")), _positive(cpu.get("period"))
    return quota / period if quota and period else 0.0


def container_cpu_limit(spec: Mapping[str, Any]) -> float:
    """CPUs a container's OCI spec allows; 0.0 for no limit."""
    return cpu_limit(_table(_table(spec, "linux"), "resources"))


def memory_limit(resources: Mapping[str, Any]) -> int:
    """Bytes an OCI LinuxResources allows; 0 for no limit."""
    return _positive(_table(resources, "memory").get("limit")) or 0


def container_memory_limit(spec: Mapping[str, Any]) -> int:
    """Bytes a container's OCI spec allows; 0 for no limit."""
    return memory_limit(_table(_table(spec, "linux"), "resources"))


def sandbox_spec(spec: Mapping[str, Any]) -> SandboxSpec:
    """The `SandboxSpec` of a pod, from its sandbox container's OCI spec."""
    notes = spec_annotations(spec)
    return SandboxSpec(
        hostname=str(spec.get("hostname") or ""),
        netns_path=_netns_path(spec),
        host_network=not any(isinstance(ns, dict) and ns.get("type") == "network"
                             for ns in _table(spec, "linux").get("namespaces") or []),
        annotations=notes,
        resources=_resources(spec, notes),
        cgroups_path=str(_table(spec, "linux").get("cgroupsPath") or ""),
    )
