"""Cleaning up after a shim that is gone, from the state on disk alone (`shim delete`).

Nothing is touched while the shim recorded in the sandbox's state still lives (same pid
and start time): a live shim cleans up after itself, and a ``shim delete`` run for the
same id in another namespace, or while the daemon's socket did not answer, must never
kill its VM. A sandbox left by a shim from before namespaces (``sbs/<id>``) is cleaned the
same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hostos.cgroups import remove_dir
from hostos.procs import ProcessRecord, is_alive, kill_recorded
from sandbox import storage
from sandbox.state import (
    NetworkRecord,
    SandboxRecord,
    legacy_sandbox_path,
    read_record,
    remove_namespace_dir_if_empty,
    remove_socket_dir,
    sandbox_path,
    socket_dir_path,
)
from sandbox.types import validate_id

log = logging.getLogger(__name__)
CGROUP_MOUNTS = "/sys/fs/cgroup/"


def shim_alive(record: SandboxRecord) -> bool:
    """Whether the shim that wrote ``record`` still runs (pid and start time both match)."""
    return record.shim_pid > 0 and is_alive(
        ProcessRecord(record.shim_pid, record.shim_start_time, "shim")
    )


def exited_shim(state_dir: Path, namespace: str, sandbox_id: str) -> int | None:
    """The pid of the shim the sandbox's record names when that shim has exited (a zombie
    counts); None when it runs, or no record names one."""
    for path in _paths(state_dir, namespace, sandbox_id):
        record = read_record(path) if path.is_dir() else None
        if record is not None and record.shim_pid > 0 and not shim_alive(record):
            return record.shim_pid
    return None


def _paths(state_dir: Path, namespace: str, sandbox_id: str) -> list[Path]:
    validate_id("sandbox", sandbox_id)
    return [sandbox_path(state_dir, validate_id("namespace", namespace), sandbox_id),
            legacy_sandbox_path(state_dir, sandbox_id)]  # fmt: skip


def cleanup_after_crash(state_dir: Path, namespace: str, sandbox_id: str) -> bool:
    """Kill the sandbox's recorded processes, unmount, remove its dir; True if any existed
    (False too when its shim still lives: then nothing is touched)."""
    cleaned = False
    sockets = socket_dir_path(state_dir, validate_id("namespace", namespace), sandbox_id)
    for path in _paths(state_dir, namespace, sandbox_id):
        if not path.is_dir() or (path.name == sandbox_id and path.parent.name == "sbs"
                                 and not (path / "state.json").exists()
                                 and not (path / "shared").exists()):  # fmt: skip
            continue  # nothing there, or a namespace directory that shares the id's name
        record = read_record(path)
        if record is not None and shim_alive(record):
            log.warning("sandbox %s: shim pid %d still runs it; not cleaning %s",
                        sandbox_id, record.shim_pid, path)  # fmt: skip
            continue
        if record is not None:
            kill_recorded([ProcessRecord(p.pid, p.start_time, p.role) for p in record.processes])
        if record is not None:
            for line in unwire_recorded(record.network):
                log.warning("sandbox %s: network left behind: %s", sandbox_id, line)
            for d in record.host_cgroups:
                if d.startswith(CGROUP_MOUNTS):  # ours (state.json is root-only): still check
                    remove_dir(d)
        storage.unmount_tree(path)
        storage.remove_tree(path)
        remove_namespace_dir_if_empty(path)
        cleaned = True
    if cleaned or (sockets.is_dir() and not _paths_exist(state_dir, namespace, sandbox_id)):
        remove_socket_dir(sockets)
    return cleaned


def _paths_exist(state_dir: Path, namespace: str, sandbox_id: str) -> bool:
    return any(p.is_dir() for p in _paths(state_dir, namespace, sandbox_id))


def unmount_container(state_dir: Path, namespace: str, sandbox_id: str,
                      container_id: str) -> None:  # fmt: skip
    """Unmount and remove one container's rootfs and volumes (idempotent).

    A shim of this version mounts in a namespace of its own, gone with it; a shim of an
    older version mounted under ``shared/`` in the host's namespace.
    """
    validate_id("container", container_id)
    for base in _paths(state_dir, namespace, sandbox_id):
        record = read_record(base)
        if record is not None and shim_alive(record):
            continue
        for top in ("mounts", "shared"):
            directory = base / top / "containers" / container_id
            storage.unmount_tree(directory)
            storage.remove_tree(directory)


def unwire_recorded(records: list[NetworkRecord]) -> list[str]:
    """Remove the taps and qdiscs a dead shim made in its pod's netns (a netns that is gone
    took them along); the errors, one line each. After the VMM was killed."""
    if not records:
        return []  # `shim delete` of a pod without network never imports pyroute2
    from network.errors import NetworkConfigError, NetworkError
    from network.model import detach_recorded

    errors = []
    for r in records:
        try:
            detach_recorded(r.netns_path, r.interface, r.tap)
        except NetworkConfigError:
            continue  # the netns is gone, and with it everything we made there
        except (NetworkError, OSError) as e:
            errors.append(f"{r.tap} in {r.netns_path}: {e}")
    return errors
