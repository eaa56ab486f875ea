"""Bringing hot-plugged vCPUs and memory online (agent/hotplug.py) over a fake sysfs."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from typing import Any

import pytest

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


def test_a_block_whose_online_write_is_refused_is_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one block of the target is not enough while a block is still offline: a
    refused write once let the call return with a new DIMM's last block offline."""
    write(tmp_path / "block_size_bytes", "8000000\n")  # 128 MiB
    for index, state in enumerate(("online", "online", "offline", "offline")):
        write(tmp_path / f"memory{index}" / "state", f"{state}\n")
    refused: list[str] = []
    real_open = open

    def flaky_open(path: str, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if "w" in mode and path.endswith("memory3/state") and not refused:
            refused.append(path)
            raise OSError(errno.EBUSY, "busy")
        return real_open(path, mode, *args, **kw)

    monkeypatch.setattr(hotplug, "open", flaky_open, raising=False)
    assert asyncio.run(hotplug.bring_memory_online(512, str(tmp_path), timeout=5)) == 512
    assert refused and (tmp_path / "memory3" / "state").read_text() == "online"


def test_a_block_short_of_the_target_gets_one_more_look(tmp_path: Path) -> None:
    """A block that appears after the scan that came within one block of the target is
    still onlined; a target that stays a block short (a hole) is accepted then."""
    write(tmp_path / "block_size_bytes", "8000000\n")  # 128 MiB
    for index in range(3):
        write(tmp_path / f"memory{index}" / "state", "online\n")

    async def late_block() -> int:
        call = asyncio.ensure_future(hotplug.bring_memory_online(512, str(tmp_path), 5))
        await asyncio.sleep(0.05)  # after the first scan, before the next
        write(tmp_path / "memory3" / "state", "offline\n")
        return await call

    assert asyncio.run(late_block()) == 512
    assert (tmp_path / "memory3" / "state").read_text() == "online"
    assert asyncio.run(hotplug.bring_memory_online(640, str(tmp_path), timeout=5)) == 512
