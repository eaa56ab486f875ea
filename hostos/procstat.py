"""Resource figures of one host process from /proc: CPU time, RSS, PSS, fds, threads.

What the metrics endpoint reports for the shim, the VMM and its helpers. A process is named
by pid and, when known, its start time (field 22 of stat): a reused pid reads as gone
rather than as someone else's figures. Reading smaps_rollup walks the process's page
tables (milliseconds for a VMM with a large guest): call `sample` off the event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: Field numbers of /proc/<pid>/stat (man proc(5)), counted from 1.
UTIME, STIME, NUM_THREADS, START_TIME, RSS_PAGES = 14, 15, 20, 22, 24


@dataclass(frozen=True)
class ProcessSample:
    """One reading of a process's resources."""

    cpu_seconds: float  # user + system
    rss_bytes: int
    #: Proportional set size (shared pages split between their users); None if unreadable.
    pss_bytes: int | None
    open_fds: int
    threads: int


def parse_stat(raw: bytes) -> dict[int, str] | None:
    """/proc/<pid>/stat as {field number: text}, from field 3 (state) on; None if malformed.

    comm (field 2) may hold spaces and parentheses: the fields start after the last ")".
    """
    end = raw.rfind(b")")
    if end < 0:
        return None
    words = raw[end + 1 :].decode("ascii", "replace").split()
    return {number: word for number, word in enumerate(words, start=3)}


def parse_pss(text: str) -> int | None:
    """The ``Pss:`` line of smaps_rollup, in bytes."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            words = line.split()
            if len(words) >= 2 and words[1].isdigit():
                return int(words[1]) * 1024
    return None


def sample(pid: int, started: int | None = None, proc: Path = PROC) -> ProcessSample | None:
    """The figures of ``pid`` (checked against its start time ``started``); None if it is
    gone, a zombie, or another process by now."""
    base = proc / str(pid)
    try:
        fields = parse_stat((base / "stat").read_bytes())
        if fields is None or fields.get(3) in (None, "Z", "X"):
            return None
        if started is not None and fields.get(START_TIME) != str(started):
            return None
        ticks = int(fields[UTIME]) + int(fields[STIME])
        rss = int(fields[RSS_PAGES]) * os.sysconf("SC_PAGE_SIZE")
        threads = int(fields[NUM_THREADS])
        fds = len(os.listdir(base / "fd"))
    except (OSError, KeyError, ValueError):
        return None
    try:
        pss = parse_pss((base / "smaps_rollup").read_text())
    except OSError:  # kernels before 4.14, or no permission
        pss = None
    return ProcessSample(cpu_seconds=ticks / os.sysconf("SC_CLK_TCK"), rss_bytes=rss,
                         pss_bytes=pss, open_fds=fds, threads=threads)
