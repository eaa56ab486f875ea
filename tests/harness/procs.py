"""Small /proc helpers: find processes by command line or environment, kill them, poll."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Proc:
    pid: int
    argv: tuple[str, ...]

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def argv_of(pid: int) -> tuple[str, ...]:
    raw = _read(f"/proc/{pid}/cmdline")
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def environ_of(pid: int) -> str:
    return _read(f"/proc/{pid}/environ").replace(b"\0", b"\n").decode(errors="replace")


def is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return not stat or stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def processes() -> list[Proc]:
    """Every live (non-zombie) process with a command line."""
    result = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (argv := argv_of(int(entry))) and not is_zombie(int(entry)):
            result.append(Proc(int(entry), argv))
    return result


def matching(patterns: Iterable[str], scope: Iterable[str] = ()) -> list[Proc]:
    """Processes whose command line contains one of `patterns`.

    With `scope`, only those whose command line or environment mentions one of its strings
    (a private containerd's directory or address): other test sessions may run their own.
    """
    pats, scopes = tuple(patterns), tuple(scope)
    me = os.getpid()
    found = []
    for proc in processes():
        if proc.pid == me or not any(p in proc.cmdline for p in pats):
            continue
        if scopes and not any(s in proc.cmdline or s in environ_of(proc.pid) for s in scopes):
            continue
        found.append(proc)
    return found


def kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and not is_zombie(pid)


def all_gone(pids: Iterable[int]) -> bool:
    return not any(alive(pid) for pid in pids)


def wait_until(pred: Callable[[], T], timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll `pred` until it returns a truthy value; return that value, or the last falsy
    one once `timeout` has passed. Cleanup after `ctr run --rm` is asynchronous."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])
