"""Rewriting an OCI runtime spec from the host's view to the guest's.

What changes, and why:
- ``root.path`` points at the container's rootfs as the guest sees it through the share;
- namespaces that carry a ``path`` name host namespaces the guest does not have, and the
  ``network`` namespace is dropped so containers use the VM's network (the pod's);
- hooks would run host binaries; AppArmor/SELinux labels and host devices mean nothing in
  the guest;
- bind mounts of host paths are not shared into the guest yet, so they are dropped (and
  reported) rather than failing the container.
"""

from __future__ import annotations

import copy
from typing import Any

GUEST_SHARED_DIR = "/run/kata-containers/shared"
SHARED_FS_TAG = "kataShared"


def guest_rootfs(container_id: str) -> str:
    """Where the guest sees a container's rootfs."""
    return f"{GUEST_SHARED_DIR}/containers/{container_id}/rootfs"


def spec_for_guest(spec: dict[str, Any], container_id: str) -> tuple[dict[str, Any], list[str]]:
    """Return the guest spec and the host bind-mount destinations that were left out."""
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
    dropped: list[str] = []
    mounts = []
    for m in out.get("mounts", []):
        if m.get("type") == "bind" or "bind" in m.get("options", []) or "rbind" in m.get(
            "options", []
        ):
            dropped.append(str(m.get("destination", "")))
            continue
        mounts.append(m)
    out["mounts"] = mounts
    return out, dropped
