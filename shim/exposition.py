"""A pod snapshot as Prometheus text exposition, written by ``prometheus_client``.

The only module that imports prometheus_client: the daemon loads it, ``start`` and
``delete`` never do. Values are read at scrape time: the endpoint takes a
`sandbox.monitor.PodSnapshot` (the agent calls are async, so they are gathered on the loop
first), and `render` runs a `SnapshotCollector` on a fresh registry. Every family carries
``sandbox_id``; the per-container ones ``container_id`` too. docs/metrics.md lists them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from sandbox.monitor import CgroupStats, PodSnapshot, ProcessSample
from sandbox.state import VMM_ROLE

__all__ = ["CONTENT_TYPE_LATEST", "SnapshotCollector", "render"]

PREFIX = "kata"
#: Family prefix of a host process by role; other roles (the VMM's helpers) use their own.
ROLE_PREFIX = {VMM_ROLE: "hypervisor"}
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
GUEST_GAUGES = (
    ("memory_total_bytes", "mem_total_bytes", "MemTotal of the guest"),
    ("memory_free_bytes", "mem_free_bytes", "MemFree of the guest"),
    ("memory_available_bytes", "mem_available_bytes", "MemAvailable of the guest"),
    ("load1", "load1", "1-minute load average of the guest"),
    ("load5", "load5", "5-minute load average of the guest"),
    ("load15", "load15", "15-minute load average of the guest"),
    ("uptime_seconds", "uptime_seconds", "seconds since the guest booted"),
    ("agent_rss_bytes", "agent_rss_bytes", "resident set of the agent (the guest's PID 1)"),
)


def _gauge(name: str, doc: str, labels: list[str], values: list[str],
           value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
    family.add_metric(values, value)
    return family


def process_families(component: str, what: str, s: ProcessSample, sandbox_id: str,
                     tasks: int | None = None) -> Iterator[Metric]:
    """CPU, memory, fds and threads of one host process."""
    labels, values = ["sandbox_id"], [sandbox_id]
    cpu = CounterMetricFamily(f"{PREFIX}_{component}_cpu_seconds", f"CPU time (user + system) "
                              f"of the {what}, seconds", labels=labels)
    cpu.add_metric(values, s.cpu_seconds)
    yield cpu
    yield _gauge(f"{component}_rss_bytes", f"resident set size of the {what}", labels, values,
                 s.rss_bytes)
    if s.pss_bytes is not None:
        yield _gauge(f"{component}_pss_bytes", f"proportional set size of the {what} "
                     "(smaps_rollup)", labels, values, s.pss_bytes)
    yield _gauge(f"{component}_open_fds", f"open file descriptors of the {what}", labels,
                 values, s.open_fds)
    yield _gauge(f"{component}_threads", f"threads of the {what}", labels, values, s.threads)
    if tasks is not None:
        yield _gauge(f"{component}_tasks", f"asyncio tasks of the {what}", labels, values, tasks)


def container_families(containers: dict[str, CgroupStats], sandbox_id: str) -> Iterator[Metric]:
    """Each live container's cgroup CPU and memory, as its guest cgroup reports them."""
    labels = ["sandbox_id", "container_id"]
    cpu = CounterMetricFamily(f"{PREFIX}_container_cpu_seconds", "CPU time of the container's "
                              "cgroup in the guest (cpu.stat usage_usec), seconds", labels=labels)
    memory = GaugeMetricFamily(f"{PREFIX}_container_memory_usage_bytes", "memory.current of "
                               "the container's cgroup in the guest", labels=labels)
    limit = GaugeMetricFamily(f"{PREFIX}_container_memory_limit_bytes", "memory.max of the "
                              "container's cgroup in the guest (absent: no limit)", labels=labels)
    pids = GaugeMetricFamily(f"{PREFIX}_container_pids", "pids.current of the container's "
                             "cgroup in the guest", labels=labels)
    for cid, stats in sorted(containers.items()):
        values = [sandbox_id, cid]
        cpu.add_metric(values, stats.cpu_stat.get("usage_usec", 0) / 1e6)
        memory.add_metric(values, stats.memory_current)
        if stats.memory_max:
            limit.add_metric(values, stats.memory_max)
        pids.add_metric(values, stats.pids_current)
    yield from (cpu, memory, limit, pids)


def agent_families(snap: PodSnapshot) -> Iterator[Metric]:
    """Whether the agent answered this scrape, and how long its calls took."""
    up = any(c.ok for c in snap.agent_calls if c.method == "GetGuestStats")
    yield _gauge("agent_up", "1 if the agent answered this scrape's GetGuestStats",
                 ["sandbox_id"], [snap.sandbox_id], 1 if up else 0)
    latency = GaugeMetricFamily(f"{PREFIX}_agent_rpc_duration_seconds", "round trip of this "
                                "scrape's agent calls (the slowest of each method), seconds",
                                labels=["sandbox_id", "method", "outcome"])
    slowest: dict[tuple[str, str], float] = {}
    for call in snap.agent_calls:
        key = (call.method, "ok" if call.ok else "failed")
        slowest[key] = max(slowest.get(key, 0.0), call.seconds)
    for (method, outcome), seconds in sorted(slowest.items()):
        latency.add_metric([snap.sandbox_id, method, outcome], seconds)
    yield latency


class SnapshotCollector(Collector):
    """The families of one `PodSnapshot` (a collector for one scrape)."""

    def __init__(self, snap: PodSnapshot, tasks: int) -> None:
        self._snap, self._tasks = snap, tasks

    def collect(self) -> Iterator[Metric]:
        snap = self._snap
        if snap.shim is not None:
            yield from process_families("shim", "shim daemon", snap.shim, snap.sandbox_id,
                                        self._tasks)
        for role, reading in sorted(snap.processes.items()):
            component = ROLE_PREFIX.get(role, role)
            if _NAME.fullmatch(component):
                yield from process_families(component, f"{component} process", reading,
                                            snap.sandbox_id)
        if snap.guest is not None:
            for name, attr, doc in GUEST_GAUGES:
                yield _gauge(f"guest_{name}", doc, ["sandbox_id"], [snap.sandbox_id],
                             getattr(snap.guest, attr))
        yield from container_families(snap.containers, snap.sandbox_id)
        yield from agent_families(snap)


def render(snap: PodSnapshot, tasks: int) -> bytes:
    """The text exposition of ``snap`` (``tasks``: the shim's asyncio tasks)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snap, tasks))
    return generate_latest(registry)
