"""`make bench` kept working: its QUICK form runs every figure against the real stack and
writes results that validate against their schema, a chart and a table (the numbers are
the benchmark's business, never this test's)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import jsonschema
import pytest

from benchmarks import suite
from benchmarks.phases import PHASES
from tests.harness import kataconfig

REPO = Path(__file__).resolve().parents[2]
FIGURES = {"cold run", "boot floor", "VM template", "CRI pod start", "pod alone", "pods at once",
           "memory, 1 pod", f"memory, {suite.QUICK.parallel} pods", "shim", "exec", "stdout"}


def our_vmm_children() -> list[str]:
    """QEMU and virtiofsd processes this test process started (`kata-runtime factory
    init`'s, which run outside containerd) and still has."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and any(
                name in cmdline for name in ("qemu-system", "virtiofsd")):
            found.append(f"{entry}: {cmdline[:200]}")
    return found


def test_the_quick_bench_writes_every_figure(
        guest_release: str, tmp_path: Path,
        bench_leak_checked: Callable[[ModuleType, str], None]) -> None:
    bench_leak_checked(suite, "kata_cri_containerd")
    doc = tmp_path / "performance.md"
    doc.write_text((REPO / "docs" / "performance.md").read_text())
    assert suite.main(["--quick", "--out", str(tmp_path / "out"), "--doc", str(doc)]) == 0

    [result] = (tmp_path / "out").glob("bench-*.json")
    run = json.loads(result.read_text())
    jsonschema.validate(run, json.loads((REPO / "docs/bench-results.schema.json").read_text()))
    figures = run["figures"]
    # Templates need PCIe root ports (q35), as hot-plug does: on microvm a note says why not.
    templates = kataconfig.can_hotplug()
    no_template = [n for n in run["meta"]["notes"] if n.startswith("VM template: no figure")]
    assert bool(no_template) != templates, run["meta"]["notes"]
    assert set(figures) == (FIGURES if templates else FIGURES - {"VM template"})
    # runc's CRI pod starts too: the harness's containerd keeps oom_score_adj where a root
    # without CAP_SYS_RESOURCE can set it (tests/harness/containerd.py config_toml).
    assert not [n for n in run["meta"]["notes"] if "no runc" in n], run["meta"]["notes"]
    for name, runtimes in figures.items():
        expected = {"kata"} if name in ("boot floor", "VM template") else {"runc", "kata"}
        assert set(runtimes) == expected, (name, runtimes)
    kata = figures["cold run"]["kata"]
    assert len(kata["wall s"]) == suite.QUICK.cold
    assert {f"{p} s" for p in PHASES} <= set(kata), "the breakdown is missing phases"
    assert sum(kata[f"{p} s"][0] for p in PHASES) == pytest.approx(kata["wall s"][0], abs=0.05)
    assert figures["memory, 1 pod"]["kata"]["vmm PSS per pod MiB"][0] > 32
    assert figures["memory, 1 pod"]["kata"]["agent RSS (guest) MiB"][0] > 1
    assert our_vmm_children() == [], "the template's QEMU or virtiofsd was left running"
    assert result.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    table = result.with_suffix(".md").read_text()
    assert "| cold run | wall s |" in table and table in doc.read_text()
    if templates:
        check_template_figure(figures["VM template"]["kata"])


def check_template_figure(vm_template: dict[str, list[float]]) -> None:
    """Restored pods, and pods from the VM cache, ran (the suite checks the shim's log
    said so) beside cold ones."""
    assert len(vm_template["restored: wall s"]) == len(vm_template["cold: wall s"]) == \
        suite.QUICK.template
    assert vm_template["template state MiB"][0] > 1 and vm_template["template boot s"][0] > 0
    assert len(vm_template["restored: to container started s"]) == suite.QUICK.template
    full = "restored, default-size template"  # without hot-plug: a 2048 MiB template
    assert len(vm_template[f"{full}: wall s"]) == len(
        vm_template[f"{full}: to container started s"]) == suite.QUICK.template
    # Pods that took a VM the cache booted ahead (the suite checks the shim said so).
    for name, _slots in suite.CACHE_VARIANTS:
        assert len(vm_template[f"{name}: wall s"]) == len(
            vm_template[f"{name}: to container started s"]) == suite.QUICK.template
