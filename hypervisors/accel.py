"""Choosing the QEMU accelerator: KVM where it really works, else TCG.

Theory of operation: the decision is a pure function, `decide`, of the configured
``accelerator`` and a `KvmProbe` (what the host said about /dev/kvm and the CPU flags).
`probe_kvm` gathers those facts (open /dev/kvm, ``KVM_GET_API_VERSION``, ``KVM_CREATE_VM``,
``vmx``/``svm`` in /proc/cpuinfo); `choose_accelerator` runs the probe once per process and
caches the answer.

Why the CPU flag matters: some hosts expose /dev/kvm through a paravirtual provider (PVM)
without hardware virtualisation. ``KVM_CREATE_VM`` succeeds there but a stock guest kernel
dies with "KVM internal error ... emulation failure". So "auto" picks KVM only when the
device opens, a VM can be created *and* the CPU advertises vmx or svm. An explicit "kvm" is
honoured whenever the device works (the reason string then carries a warning); an explicit
"tcg" is always honoured.
"""

from __future__ import annotations

import fcntl
import functools
import os
from dataclasses import dataclass
from typing import Literal

from hypervisors.errors import HypervisorError

Accelerator = Literal["kvm", "tcg"]

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_API_VERSION = 12


@dataclass(frozen=True)
class KvmProbe:
    """What the host says about KVM. ``problem`` explains the first thing that failed."""

    device_usable: bool
    create_vm_ok: bool
    cpu_virt_flag: str | None
    problem: str = ""


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use and a human-readable reason (for logs and `kata-runtime check`)."""

    accelerator: Accelerator
    reason: str


def cpu_virt_flag(cpuinfo: str) -> str | None:
    """Return "vmx" or "svm" if the first CPU's ``flags`` line has it, else None."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return next((f for f in ("vmx", "svm") if f in flags), None)
    return None


def tsc_khz(cpuinfo: str) -> int | None:
    """The host TSC's rate in kHz from /proc/cpuinfo: the first CPU's ``cpu MHz`` when its
    flags say the TSC runs at a constant, known rate (``constant_tsc`` and
    ``tsc_known_freq``); None otherwise.

    Why: a TCG guest's TSC ticks at the host's rate, and a guest with neither HPET nor
    kvmclock (QEMU microvm) must calibrate it against the PIT, which under TCG fails on a
    busy host and hangs the boot (seen here on 2 of 3 boots). ``tsc_early_khz=`` tells the
    guest the rate instead."""
    mhz: float | None = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
        elif key == "flags":
            flags = set(value.split())
            if not {"constant_tsc", "tsc_known_freq"} <= flags:
                return None
            break
    return round(mhz * 1000) if mhz else None


@functools.cache
def host_tsc_khz(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    """`tsc_khz` of this host (cached; None where unreadable)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            return tsc_khz(f.read(65536))
    except OSError:
        return None


def probe_kvm(device: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> KvmProbe:
    """Open ``device``, check the API version, create and drop one VM, read the CPU flags."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flag = cpu_virt_flag(f.read())
    except OSError:
        flag = None
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmProbe(False, False, flag, f"cannot open {device}: {exc.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return KvmProbe(False, False, flag, f"{device} has KVM API version {version}")
        try:
            os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
        except OSError as exc:
            return KvmProbe(True, False, flag, f"KVM_CREATE_VM failed: {exc.strerror}")
        return KvmProbe(True, True, flag)
    except OSError as exc:
        return KvmProbe(False, False, flag, f"ioctl on {device} failed: {exc.strerror}")
    finally:
        os.close(fd)


def decide(requested: str, probe: KvmProbe) -> AccelChoice:
    """Pick the accelerator for ``requested`` ("auto", "kvm" or "tcg") given ``probe``."""
    if requested == "tcg":
        return AccelChoice("tcg", "tcg: requested by configuration (software emulation)")
    kvm_works = probe.device_usable and probe.create_vm_ok
    if requested == "kvm":
        if not kvm_works:
            raise HypervisorError(f"failed to use accelerator kvm: {probe.problem}")
        if probe.cpu_virt_flag is None:
            return AccelChoice(
                "kvm", "kvm: requested by configuration (warning: CPU has no vmx/svm flag; "
                "stock guest kernels may fail under a paravirtual KVM)",
            )
        flag = probe.cpu_virt_flag
        return AccelChoice("kvm", f"kvm: requested by configuration (CPU has {flag})")
    if requested != "auto":
        raise HypervisorError(f"failed to choose accelerator: unknown value {requested!r}")
    if not kvm_works:
        return AccelChoice("tcg", f"tcg: KVM is not usable ({probe.problem})")
    if probe.cpu_virt_flag is None:
        return AccelChoice(
            "tcg", "tcg: /dev/kvm works but the CPU has no vmx/svm flag (paravirtual KVM such "
            "as PVM, where stock guest kernels fail)",
        )
    return AccelChoice("kvm", f"kvm: /dev/kvm works and the CPU has {probe.cpu_virt_flag}")


@functools.cache
def _cached_probe() -> KvmProbe:
    return probe_kvm()


def choose_accelerator(requested: str) -> AccelChoice:
    """Decide for this host; the probe runs at most once per process."""
    if requested == "tcg":
        return decide(requested, KvmProbe(False, False, None, "not probed"))
    return decide(requested, _cached_probe())
