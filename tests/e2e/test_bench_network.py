"""`benchmarks.pod_network` kept working: one small transfer each way and a few pings, for
runc and kata with the default model, tcfilter (the full run, with macvtap, is `make bench`;
its figures are in the README). Both models carry traffic both ways in test_network.py, and
the benchmark measures them alike."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from benchmarks import pod_network


def test_a_small_network_benchmark_runs_for_runc_and_kata(
        guest_release: str, bench_leak_checked: Callable[[ModuleType, str], None]) -> None:
    bench_leak_checked(pod_network, "kata_containerd")
    figures = pod_network.run(n=1, mib=1, runtimes=pod_network.RUNTIMES[:2], pings=3)
    assert [f.runtime for f in figures] == ["runc", "kata tcfilter"]
    for f in figures:
        assert f.upload_mib_s > 0 and f.download_mib_s > 0 and f.rtt_ms > 0, f
