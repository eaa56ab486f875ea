"""Bringing hot-plugged vCPUs and memory online in the guest.

QEMU's ``device_add`` makes a vCPU or a DIMM present; with no udev in the guest nobody
writes its ``online``/``state`` file, so the agent does, waiting (bounded) for the ACPI
event to make it appear.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable

CPU_DIR = "/sys/devices/system/cpu"
WAIT_SECONDS = 20.0  # a TCG guest handles the ACPI hot-plug event slowly
_CPU = re.compile(r"cpu[0-9]+")


def online_count(cpu_dir: str = CPU_DIR) -> int:
    """vCPUs online now (cpu0 has no ``online`` file: it is always online)."""
    count = 0
    for name in os.listdir(cpu_dir):
        if not _CPU.fullmatch(name):
            continue
        path = os.path.join(cpu_dir, name, "online")
        try:
            with open(path) as f:
                count += f.read().strip() == "1"
        except FileNotFoundError:
            count += 1
    return count


def _online_entries(directory: str, pattern: re.Pattern[str], file: str, offline: str,
                    online: str) -> int:
    """Write ``online`` to each ``<directory>/<name>/<file>`` that reads ``offline``; how
    many are still offline (a write the kernel refused: the next round tries again)."""
    left = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name, file)
        if not pattern.fullmatch(name) or not os.path.exists(path):
            continue
        with open(path) as f:
            if f.read().strip() != offline:
                continue
        try:
            with open(path, "w") as f:
                f.write(online)
        except OSError:
            left += 1
    return left


async def _until(step: Callable[[], int], reached: Callable[[int], bool],
                 timeout: float) -> int:
    """Run ``step`` every 0.2 s until ``reached`` holds for its result or ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = step()
        if reached(result) or loop.time() >= deadline:
            return result
        await asyncio.sleep(0.2)


def online_all(cpu_dir: str = CPU_DIR) -> None:
    """Write 1 to every offline vCPU's ``online`` file."""
    _online_entries(cpu_dir, _CPU, "online", "0", "1")


async def bring_online(wanted: int, cpu_dir: str = CPU_DIR,
                       timeout: float = WAIT_SECONDS) -> int:
    """Online every present vCPU until ``wanted`` are online or ``timeout``; the count."""
    def step() -> int:
        online_all(cpu_dir)
        return online_count(cpu_dir)

    return await _until(step, lambda count: count >= wanted, timeout)


MEMORY_DIR = "/sys/devices/system/memory"
_BLOCK = re.compile(r"memory[0-9]+")


def _block_size(memory_dir: str) -> int:
    with open(os.path.join(memory_dir, "block_size_bytes")) as f:
        return int(f.read().strip(), 16)


def online_memory_mib(memory_dir: str = MEMORY_DIR) -> int:
    """MiB of memory in online blocks (boot memory and hot-plugged DIMMs)."""
    size = _block_size(memory_dir)
    count = 0
    for name in os.listdir(memory_dir):
        if _BLOCK.fullmatch(name):
            with open(os.path.join(memory_dir, name, "state")) as f:
                count += f.read().strip() == "online"
    return count * size >> 20


def online_all_memory(memory_dir: str = MEMORY_DIR) -> int:
    """Write "online" to every offline memory block; how many are still offline."""
    return _online_entries(memory_dir, _BLOCK, "state", "offline", "online")


async def bring_memory_online(wanted_mib: int, memory_dir: str = MEMORY_DIR,
                              timeout: float = WAIT_SECONDS) -> int:
    """Online every offline memory block until ``wanted_mib`` are online and no block is
    left offline, or ``timeout``; the MiB online. Short of ``wanted_mib`` by less than a
    block (boot memory can have holes) counts as there after one more look. A clean-clone
    CI run once saw a call return a block short and that block stay offline: a refused
    write, or a block that appeared after the last scan."""
    slack = _block_size(memory_dir) >> 20
    left, near = 0, 0  # blocks still offline; looks in a row that came within the slack

    def step() -> int:
        nonlocal left
        left = online_all_memory(memory_dir)
        return online_memory_mib(memory_dir)

    def reached(online: int) -> bool:
        nonlocal near
        near = near + 1 if online + slack >= wanted_mib else 0
        return not left and (online >= wanted_mib or near > 1)

    return await _until(step, reached, timeout)
