"""benchmarks.measure's process roles (shared by suite, footprint, machines, pod_overhead)
and the medians table machines and levers print."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import machines, measure
from tests.harness import procs

SCOPE = "/run/ktest-abc"
SHIM_ARGS = ("-namespace", "ns", "-address", f"{SCOPE}/c.sock", "-id", "pod1")
PROCESSES = [
    # The source shim: the venv's Python runs the console script.
    procs.Proc(10, ("/work/.venv/bin/python3", "/work/.venv/bin/containerd-shim-kata-v2",
                    *SHIM_ARGS)),
    procs.Proc(11, ("/work/.venv/bin/python3", "/work/.venv/bin/containerd-shim-kata-v2",
                    *SHIM_ARGS, "start")),  # containerd's short-lived `start`: not a daemon
    procs.Proc(12, ("/usr/bin/containerd-shim-runc-v2", *SHIM_ARGS)),
    # QEMU names virtiofsd's socket: it is the VMM, never virtiofsd.
    procs.Proc(20, ("/usr/bin/qemu-system-x86_64", "-chardev",
                    f"socket,id=fs,path={SCOPE}/kata-state/sbs/ns/pod1/virtiofsd.sock")),
    procs.Proc(30, ("/usr/lib/qemu/virtiofsd",
                    f"--socket-path={SCOPE}/kata-state/sbs/ns/pod1/virtiofsd.sock")),
    # A process whose arguments merely mention a shim (a `ctr` call, a log tail).
    procs.Proc(40, ("/usr/bin/tail", "-f", f"{SCOPE}/containerd-shim-kata-v2.log")),
]


def fake_matching(patterns: list[str], scope: Any = ()) -> list[procs.Proc]:
    return [p for p in PROCESSES if any(pat in p.cmdline for pat in patterns)]


def test_roles_go_by_program_name_not_by_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "matching", fake_matching)
    cd: Any = SimpleNamespace(dir=SCOPE, address=f"{SCOPE}/c.sock")
    assert measure.role_pids(cd) == {"shim": [10, 12], "vmm": [20], "virtiofsd": [30]}


def test_cpu_ticks_of_a_live_process_and_of_none() -> None:
    deadline = os.times().elapsed + 0.05
    while os.times().elapsed < deadline:  # burn a few ticks of our own
        pass
    assert measure.cpu_ticks(os.getpid()) > 0
    assert measure.cpu_ticks(2**22 + 1) == 0  # above pid_max's ceiling: never a process


def test_memory_of_a_live_process_and_of_none() -> None:
    rss, pss = measure.memory_kib(os.getpid())
    assert rss > 0 and 0 < pss <= rss
    assert measure.memory_kib(2**22 + 1) == (0, 0)


def test_the_medians_table(capsys: pytest.CaptureFixture[str]) -> None:
    machines.report({"q35": {"wall s": [1.0, 9.0, 2.0]}, "runc": {"wall s": [0.1]}})
    header, row = capsys.readouterr().out.splitlines()
    assert header == " " * 20 + "         q35        runc   (median)"
    assert row == "wall s" + " " * 14 + "        2.00        0.10   n=3"

    long_key = "right after dd MemAvailable drop MiB"  # levers' keys need 36 columns
    machines.report({"on": {long_key: [3.0]}, "off": {}}, key_width=36)
    _, row = capsys.readouterr().out.splitlines()
    assert row == long_key + "        3.00           -   n=1"
