"""Reading a container's cgroup v2 files in the guest (for Stats and OOM reports).

Files are read with a size cap and parsed leniently: a line that is not ``key value`` with
an integer value is skipped, so a kernel with more or fewer fields still answers.
"""

from __future__ import annotations

import os

MAX_FILE = 16 * 1024  # memory.stat is ~1.5 KiB on 6.1
MAX_KEYS = 128


def read_small(path: str) -> str:
    """Up to MAX_FILE bytes of a cgroup file; "" when it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, MAX_FILE).decode(errors="replace")
    finally:
        os.close(fd)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value.strip().isdigit() and len(values) < MAX_KEYS and len(key) <= 64:
            values[key] = int(value)
    return values


def parse_single(text: str) -> int:
    """A one-value file (memory.current, memory.max, pids.max): 0 for "max" or junk."""
    value = text.strip()
    return int(value) if value.isdigit() else 0


def stats(cgroup_dir: str) -> dict[str, object]:
    """The container's figures, keyed by StatsContainerResponse field."""
    def flat(name: str) -> dict[str, int]:
        return parse_flat_keyed(read_small(os.path.join(cgroup_dir, name)))

    def single(name: str) -> int:
        return parse_single(read_small(os.path.join(cgroup_dir, name)))

    return {
        "cpu_stat": flat("cpu.stat"), "memory_stat": flat("memory.stat"),
        "memory_events": flat("memory.events"), "memory_current": single("memory.current"),
        "memory_max": single("memory.max"), "pids_current": single("pids.current"),
        "pids_max": single("pids.max"), "memory_swap_current": single("memory.swap.current"),
    }


def oom_kills(cgroup_dir: str) -> int:
    """How many processes the cgroup's memory limit has killed."""
    return parse_flat_keyed(read_small(os.path.join(cgroup_dir, "memory.events"))).get(
        "oom_kill", 0)
