"""Bringing hot-plugged vCPUs and memory online (agent/hotplug.py) over a fake sysfs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent import hotplug


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_offline_vcpus_are_brought_online(tmp_path: Path) -> None:
    (tmp_path / "cpu0").mkdir()  # no online file: always online
    write(tmp_path / "cpu1" / "online", "1\n")
    write(tmp_path / "cpu2" / "online", "0\n")
    write(tmp_path / "cpufreq" / "online", "0\n")  # not a vCPU: left alone
    assert hotplug.online_count(str(tmp_path)) == 2
    assert asyncio.run(hotplug.bring_online(3, str(tmp_path), timeout=1)) == 3
    assert (tmp_path / "cpu2" / "online").read_text() == "1"
    assert (tmp_path / "cpufreq" / "online").read_text() == "0\n"


def test_a_vcpu_that_never_appears_ends_at_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "cpu0").mkdir()
    assert asyncio.run(hotplug.bring_online(2, str(tmp_path), timeout=0.3)) == 1


def test_offline_memory_blocks_are_brought_online(tmp_path: Path) -> None:
    write(tmp_path / "block_size_bytes", "8000000\n")  # 128 MiB
    write(tmp_path / "memory0" / "state", "online\n")
    write(tmp_path / "memory1" / "state", "offline\n")
    write(tmp_path / "memory2" / "state", "going-offline\n")
    assert hotplug.online_memory_mib(str(tmp_path)) == 128
    assert asyncio.run(hotplug.bring_memory_online(256, str(tmp_path), timeout=1)) == 256
    assert (tmp_path / "memory1" / "state").read_text() == "online"
    assert (tmp_path / "memory2" / "state").read_text() == "going-offline\n"
