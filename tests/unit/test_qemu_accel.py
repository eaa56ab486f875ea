"""Accelerator decision logic, with fake probes and /proc/cpuinfo texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisors.accel import KvmProbe, cpu_virt_flag, decide, probe_kvm, tsc_khz
from hypervisors.errors import HypervisorError

INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme vmx sse2 hypervisor\n"
AMD = "processor\t: 0\nflags\t\t: fpu svm sse2\n"
PVM = "processor\t: 0\nflags\t\t: fpu sse2 hypervisor\n"

WORKS = KvmProbe(True, True, "vmx")
PARAVIRT = KvmProbe(True, True, None)
NO_DEVICE = KvmProbe(False, False, "vmx", "cannot open /dev/kvm: No such file or directory")
NO_VM = KvmProbe(True, False, "svm", "KVM_CREATE_VM failed: Device or resource busy")


@pytest.mark.parametrize(("text", "flag"), [(INTEL, "vmx"), (AMD, "svm"), (PVM, None), ("", None)])
def test_cpu_virt_flag(text: str, flag: str | None) -> None:
    assert cpu_virt_flag(text) == flag


@pytest.mark.parametrize(
    ("requested", "probe", "accel", "words"),
    [
        ("auto", WORKS, "kvm", "CPU has vmx"),
        ("auto", PARAVIRT, "tcg", "no vmx/svm flag"),
        ("auto", NO_DEVICE, "tcg", "cannot open /dev/kvm"),
        ("auto", NO_VM, "tcg", "KVM_CREATE_VM failed"),
        ("tcg", WORKS, "tcg", "requested by configuration"),
        ("kvm", WORKS, "kvm", "requested by configuration"),
        ("kvm", PARAVIRT, "kvm", "warning"),
    ],
)
def test_decide(requested: str, probe: KvmProbe, accel: str, words: str) -> None:
    choice = decide(requested, probe)
    assert choice.accelerator == accel
    assert words in choice.reason


@pytest.mark.parametrize("probe", [NO_DEVICE, NO_VM])
def test_explicit_kvm_without_kvm_fails(probe: KvmProbe) -> None:
    with pytest.raises(HypervisorError, match="failed to use accelerator kvm"):
        decide("kvm", probe)


def test_unknown_request() -> None:
    with pytest.raises(HypervisorError, match="unknown value"):
        decide("hvf", WORKS)


def test_probe_missing_device(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(AMD)
    probe = probe_kvm(str(tmp_path / "kvm"), str(cpuinfo))
    assert probe == KvmProbe(False, False, "svm", probe.problem)
    assert "cannot open" in probe.problem


def test_probe_not_a_kvm_device(tmp_path: Path) -> None:
    probe = probe_kvm("/dev/null", str(tmp_path / "nope"))
    assert not probe.device_usable
    assert probe.cpu_virt_flag is None
    assert "ioctl" in probe.problem


@pytest.mark.parametrize(("cpuinfo", "khz"), [
    ("processor\t: 0\ncpu MHz\t\t: 2000.000\nflags\t\t: fpu constant_tsc tsc_known_freq\n",
     2000000),
    ("cpu MHz\t\t: 2893.204\nflags\t\t: constant_tsc tsc_known_freq nonstop_tsc\n", 2893204),
    # A TSC whose rate the host kernel only estimated, or that varies: no hint.
    ("cpu MHz\t\t: 2000.000\nflags\t\t: fpu constant_tsc\n", None),
    ("cpu MHz\t\t: 2000.000\nflags\t\t: fpu\n", None),
    ("flags\t\t: constant_tsc tsc_known_freq\n", None),
    ("cpu MHz\t\t: fast\nflags\t\t: constant_tsc tsc_known_freq\n", None),
    ("", None),
])
def test_the_host_tsc_rate_comes_from_cpuinfo_only_when_known(cpuinfo: str,
                                                              khz: int | None) -> None:
    assert tsc_khz(cpuinfo) == khz
