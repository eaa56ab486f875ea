"""Static sizing of a pod's VM from its limits (sandbox/sizing.py)."""

from __future__ import annotations

import pytest

from sandbox.errors import InvalidArgumentError
from sandbox.sizing import MIB, Limits, VmSize, vm_size
from sandbox.types import PodResources

LIMITS = Limits(static=True, base_memory_mib=256, max_vcpus=0, max_memory_mib=0,
                host_cpus=2, host_memory_mib=24 * 1024)


def test_off_means_the_configured_defaults() -> None:
    off = Limits(**{**LIMITS.__dict__, "static": False})
    assert vm_size(PodResources(100000, 100000, 512 * MIB), off) == VmSize()


def test_a_pod_without_limits_gets_the_defaults() -> None:
    assert vm_size(PodResources(), LIMITS) == VmSize()


@pytest.mark.parametrize(("quota", "period", "vcpus"), [
    (100000, 100000, 1), (50000, 100000, 1), (150000, 100000, 2), (800000, 100000, 2),
])
def test_vcpus_are_the_cpu_limit_rounded_up_and_capped_at_the_host(
        quota: int, period: int, vcpus: int) -> None:
    assert vm_size(PodResources(quota, period), LIMITS).vcpus == vcpus


def test_default_maxvcpus_caps_too() -> None:
    limits = Limits(**{**LIMITS.__dict__, "max_vcpus": 1, "host_cpus": 8})
    assert vm_size(PodResources(400000, 100000), limits).vcpus == 1


def test_memory_is_the_base_plus_the_limit() -> None:
    assert vm_size(PodResources(memory_limit_bytes=512 * MIB), LIMITS).memory_mib == 768
    assert vm_size(PodResources(memory_limit_bytes=512 * MIB + 1), LIMITS).memory_mib == 769


def test_more_than_the_maximum_is_a_clear_error() -> None:
    limits = Limits(**{**LIMITS.__dict__, "max_memory_mib": 1024})
    with pytest.raises(InvalidArgumentError, match=r"needs 2304 MiB.*1024 MiB allowed "
                                                   r"\(default_maxmemory\)"):
        vm_size(PodResources(memory_limit_bytes=2048 * MIB), limits)
    with pytest.raises(InvalidArgumentError, match="the host's memory"):
        vm_size(PodResources(memory_limit_bytes=64 * 1024 * MIB), LIMITS)
