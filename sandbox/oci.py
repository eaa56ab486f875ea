"""Rewriting an OCI runtime spec from the host's view to the guest's.

What changes, and why:
- ``root.path`` points at the container's rootfs as the guest sees it through the share;
- namespaces that carry a ``path`` name host namespaces the guest does not have, and the
  ``network`` namespace is dropped so containers use the VM's network (the pod's);
- hooks would run host binaries; AppArmor/SELinux labels and host devices mean nothing in
  the guest;
- bind mounts of host paths (volumes, CRI's /etc/hosts and resolv.conf, ...) become
  `SharedBind`s: the host bind-mounts each source into the container's share, and the guest
  spec binds it from there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

GUEST_SHARED_DIR = "/run/kata-containers/shared"
SHARED_FS_TAG = "kataShared"


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
            ns
            for ns in linux.get("namespaces", [])
            if not ns.get("path") and ns.get("type") != "network"
        ]
        linux.pop("devices", None)
        linux.pop("mountLabel", None)
        resources = linux.get("resources")
        if isinstance(resources, dict):
            resources.pop("devices", None)
    binds: list[SharedBind] = []
    for m in out.get("mounts", []):
        if is_bind(m):
            name = str(len(binds))
            binds.append(SharedBind(str(m.get("source", "")), name, "ro" in m.get("options", [])))
            m["source"] = f"{guest_mounts_dir(container_id)}/{name}"
    return out, binds
