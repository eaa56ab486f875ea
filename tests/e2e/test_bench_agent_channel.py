"""`benchmarks.agent_channel` kept working: one round of each figure over virtio-serial and
over vsock through our vhost-user back-end, a few calls and 1 MiB (the full run is in
`make bench`; its figures are in docs/performance.md)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from benchmarks import agent_channel


def test_the_agent_channel_benchmark_runs_for_both_channels(
        guest_release: str, bench_leak_checked: Callable[[ModuleType, str], None]) -> None:
    bench_leak_checked(agent_channel, "kata_containerd")
    samples = agent_channel.run(rounds=1, calls=5, mib=1, settle=0.0)
    assert list(samples) == list(agent_channel.CHANNELS)
    for name, figures in samples.items():
        assert set(figures) == {"agent ready s", "Check median us", "Check p95 us",
                                "exec true s", "stdout MiB/s", "stdin MiB/s"}, name
        assert all(len(v) == 1 and v[0] > 0 for v in figures.values()), (name, figures)
    assert "| Check median us |" in agent_channel.table(samples)
