"""Stats and Update payloads as containerd encodes them.

Stats answers with containerd's cgroup v2 ``Metrics`` (what its CRI plugin decodes for
`crictl stats`-style calls), packed in an Any whose type URL is the bare message name, as
containerd's typeurl writes it. Update brings OCI ``LinuxResources`` as JSON in an Any.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from protocols import cgroups_v2_pb2 as cg
from sandbox.errors import InvalidArgumentError

if TYPE_CHECKING:  # not at run time: `start` and `delete` must not load the agent client
    from sandbox.pod import CgroupStats

METRICS_TYPE_URL = "io.containerd.cgroups.v2.Metrics"
LINUX_RESOURCES = "LinuxResources"  # types.containerd.io/opencontainers/runtime-spec/1/...
MEMORY_STAT_FIELDS = frozenset(cg.MemoryStat.DESCRIPTOR.fields_by_name)


def metrics(stats: CgroupStats) -> cg.Metrics:
    """containerd's cgroup v2 Metrics from the guest's cgroup files."""
    cpu = stats.cpu_stat
    memory = {k: v for k, v in stats.memory_stat.items() if k in MEMORY_STAT_FIELDS}
    memory.update(usage=stats.memory_current, usage_limit=stats.memory_max or (2**64 - 1),
                  swap_usage=stats.memory_swap_current)
    events = {k: v for k, v in stats.memory_events.items()
              if k in cg.MemoryEvents.DESCRIPTOR.fields_by_name}
    return cg.Metrics(
        pids=cg.PidsStat(current=stats.pids_current, limit=stats.pids_max),
        cpu=cg.CPUStat(**{k: cpu.get(k, 0) for k in cg.CPUStat.DESCRIPTOR.fields_by_name}),
        memory=cg.MemoryStat(**memory),
        memory_events=cg.MemoryEvents(**events),
    )


def metrics_any(stats: CgroupStats) -> any_pb2.Any:
    return any_pb2.Any(type_url=METRICS_TYPE_URL,
                       value=metrics(stats).SerializeToString(deterministic=True))


def linux_resources(resources: any_pb2.Any, container_id: str) -> dict[str, Any]:
    """The OCI LinuxResources of an Update request, checked to be a JSON object."""
    if not resources.type_url.endswith(LINUX_RESOURCES):
        raise InvalidArgumentError(
            f"failed to update container {container_id}: resources of type "
            f"{resources.type_url!r}, expected OCI LinuxResources")
    try:
        value = json.loads(resources.value)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(
            f"failed to update container {container_id}: resources are not JSON: {e}") from e
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"failed to update container {container_id}: resources must be a JSON object")
    return value
