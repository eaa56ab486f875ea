"""`benchmarks.machines` kept working: one round of q35, microvm and runc (the full run is
`make bench`; its figures are in the README)."""

from __future__ import annotations

from benchmarks import machines


def test_one_round_of_the_machine_benchmark(guest_release: str) -> None:
    results = machines.measure(n=1, memory_mib=256)
    assert set(results) == {"runc", "q35", "microvm"}
    for name, figures in results.items():
        assert len(figures["wall s"]) == 1 and figures["wall s"][0] > 0, (name, figures)
    for name in ("q35", "microvm"):
        figures = results[name]
        assert figures["qemu PSS MiB"][0] > 0 and figures["virtiofsd PSS MiB"][0] > 0, figures
        assert len(figures["VM boot s (shim)"]) == 1, figures
