"""A task bundle as containerd lays it out: its OCI spec and the pod it belongs to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sandbox.errors import InvalidArgumentError
from sandbox.oci import spec_annotations

__all__ = ["group_id", "read_spec", "spec_annotations"]

SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
GROUP_ANNOTATION = "io.containerd.runc.v2.group"
CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"


def read_spec(bundle: Path) -> dict[str, Any]:
    """The OCI spec of a bundle; InvalidArgumentError if it is missing or malformed."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"failed to read {bundle}/config.json: {e}") from e
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"failed to read {bundle}/config.json: not a JSON object")
    return spec


def group_id(spec: dict[str, Any], container_id: str) -> str:
    """The id of the pod (one daemon, one VM) a container belongs to."""
    notes = spec_annotations(spec)
    return notes.get(SANDBOX_ID_ANNOTATION) or notes.get(GROUP_ANNOTATION) or container_id
