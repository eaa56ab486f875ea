"""`benchmarks.pod_network` kept working: one small transfer each way and the ping, for
runc and both kata models (the full run is `make bench`; its figures are in the README)."""

from __future__ import annotations

from benchmarks import pod_network


def test_a_small_network_benchmark_runs_for_every_runtime(guest_release: str) -> None:
    figures = pod_network.run(n=1, mib=1)
    assert [f.runtime for f in figures] == ["runc", "kata tcfilter", "kata macvtap"]
    for f in figures:
        assert f.upload_mib_s > 0 and f.download_mib_s > 0 and f.rtt_ms > 0, f
