"""`benchmarks.machines` kept working: one round of microvm and runc (the full run, with q35,
is `make bench`; its figures are in the README). q35 is the machine every other test boots,
and test_bench_suite.py measures it; this round is about the variant and the sampling."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from benchmarks import machines


def test_one_round_of_the_machine_benchmark(
        guest_release: str, bench_leak_checked: Callable[[ModuleType, str], None]) -> None:
    bench_leak_checked(machines, "kata_containerd")
    results = machines.measure(n=1, memory_mib=256, runtimes=("runc", "microvm"))
    assert set(results) == {"runc", "microvm"}
    for name, figures in results.items():
        assert len(figures["wall s"]) == 1 and figures["wall s"][0] > 0, (name, figures)
        assert figures["shim PSS MiB"][0] > 0, (name, figures)  # the variant's shim too
    figures = results["microvm"]
    assert figures["vmm PSS MiB"][0] > 0 and figures["virtiofsd PSS MiB"][0] > 0, figures
    # Roles go by program name: QEMU, whose command line names virtiofsd's socket, is not
    # also counted as virtiofsd (which maps little of the guest's RAM).
    assert figures["virtiofsd PSS MiB"][0] < figures["vmm PSS MiB"][0], figures
    assert len(figures["VM boot s (shim)"]) == 1, figures
