"""`benchmarks.template` kept working: one round of cold boot against restoring a saved VM
(each ends with the agent's CreateSandbox having mounted the share, which a restored guest
can only do through the hot-plugged virtio-fs device), and nothing left behind. The
numbers are the benchmark's business, never this test's."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from benchmarks import template

VMM_NAMES = ("qemu-system", "virtiofsd")


def our_vmm_children() -> list[str]:
    """QEMU and virtiofsd processes this test process started and still has."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and any(name in cmdline for name in VMM_NAMES):
            found.append(f"{entry}: {cmdline[:200]}")
    return found


def work_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("kata-template-bench-*")}


def test_a_restored_template_creates_a_sandbox_with_its_share(guest_release: str) -> None:
    before = work_dirs()
    result = asyncio.run(template.measure(1))

    assert result["template"]["state MiB"] > 1, result["template"]
    [cold] = result["cold"]
    [restored] = result["restored"]
    for sample in (cold, restored):
        assert sample["to sandbox s"] > 0 and sample["qemu PSS MiB"] > 1, sample
    assert 0 < restored["running s"] < restored["to sandbox s"], restored
    assert our_vmm_children() == []
    assert work_dirs() == before
