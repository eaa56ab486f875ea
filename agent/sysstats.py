"""The guest's memory and load (GetGuestStats), from /proc/meminfo, loadavg, uptime and
the agent's own /proc/self/status.

Four small reads of in-memory files: cheap even under TCG, so they run inline on the loop.
A field the kernel does not report reads as 0.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
#: /proc/meminfo keys -> GuestStatsResponse fields (the values are in kB).
MEMINFO_FIELDS = {
    "MemTotal": "mem_total_bytes",
    "MemFree": "mem_free_bytes",
    "MemAvailable": "mem_available_bytes",
}


def parse_meminfo(text: str) -> dict[str, int]:
    """The fields of MEMINFO_FIELDS in bytes, from /proc/meminfo's ``Key:  N kB`` lines."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        name = MEMINFO_FIELDS.get(key)
        words = rest.split()
        if name and words and words[0].isdigit():
            found[name] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return found


def parse_loadavg(text: str) -> dict[str, float]:
    """The 1, 5 and 15 minute load averages from /proc/loadavg."""
    words = text.split()
    try:
        return {"load1": float(words[0]), "load5": float(words[1]), "load15": float(words[2])}
    except (IndexError, ValueError):
        return {}


def parse_uptime(text: str) -> dict[str, float]:
    """Seconds since boot from /proc/uptime."""
    try:
        return {"uptime_seconds": float(text.split()[0])}
    except (IndexError, ValueError):
        return {}


def parse_status_rss(text: str) -> dict[str, int]:
    """The process's resident set (VmRSS) in bytes, from /proc/<pid>/status."""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            words = line.split()
            if len(words) == 3 and words[1].isdigit() and words[2] == "kB":
                return {"agent_rss_bytes": int(words[1]) * 1024}
    return {}


def guest_stats(proc: Path = PROC) -> dict[str, float | int]:
    """GetGuestStats' fields; OSError if /proc cannot be read."""
    return {
        **parse_meminfo((proc / "meminfo").read_text()),
        **parse_loadavg((proc / "loadavg").read_text()),
        **parse_uptime((proc / "uptime").read_text()),
        **parse_status_rss((proc / "self" / "status").read_text()),
    }
