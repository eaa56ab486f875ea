"""Cleaning up after a shim that is gone, from the state on disk alone (`shim delete`)."""

from __future__ import annotations

from pathlib import Path

from hostos.procs import ProcessRecord, kill_recorded
from sandbox import storage
from sandbox.state import read_record, sandbox_path
from sandbox.types import validate_id


def cleanup_after_crash(state_dir: Path, sandbox_id: str) -> bool:
    """Kill the sandbox's recorded processes, unmount, remove its dir; True if any existed."""
    path = sandbox_path(state_dir, validate_id("sandbox", sandbox_id))
    if not path.exists():
        return False
    record = read_record(path)
    if record is not None:
        kill_recorded([ProcessRecord(p.pid, p.start_time, p.role) for p in record.processes])
    storage.unmount_tree(path)
    storage.remove_tree(path)
    return True


def unmount_container(state_dir: Path, sandbox_id: str, container_id: str) -> None:
    """Unmount and remove one container's rootfs and volumes (idempotent).

    A shim of this version mounts in a namespace of its own, gone with it; a shim of an
    older version mounted under ``shared/`` in the host's namespace.
    """
    base = sandbox_path(state_dir, validate_id("sandbox", sandbox_id))
    for top in ("mounts", "shared"):
        directory = base / top / "containers" / validate_id("container", container_id)
        storage.unmount_tree(directory)
        storage.remove_tree(directory)
