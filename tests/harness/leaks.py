"""Leak checks: what a test may not leave behind.

    before = leaks.snapshot(cd, kata_state_dir=...)
    ...  # the test
    leaks.assert_no_leaks(before)   # polls: containerd cleans up asynchronously

Checked: VMM/virtiofsd/shim processes (new since the snapshot and attributable to this
test's containerd or kata state dir), mounts and unix sockets under those dirs, entries in
`<kata state dir>/sbs/`, shim sockets in /run/containerd/s, and tap devices named like ours.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import mounts, procs
from tests.harness.containerd import Containerd

KATA_STATE_DIR = "/run/kata-py"
PROCESS_PATTERNS = ("qemu-system", "stratovirt", "virtiofsd", "containerd-shim-kata",
                    "containerd-shim-runc-v2", "hypervisors.vsock.backend")
TAP_PATTERN = r"^(tap\d+_kata|ktap|kata-tap)"


@dataclass(frozen=True)
class Snapshot:
    kata_state_dir: str
    scope: tuple[str, ...]
    containerd: Containerd | None
    tap_pattern: str
    pids: frozenset[int] = frozenset()
    mounts: frozenset[str] = frozenset()
    sockets: frozenset[str] = frozenset()
    sandboxes: frozenset[str] = frozenset()
    taps: frozenset[str] = frozenset()


@dataclass
class Leaks:
    processes: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    sandboxes: list[str] = field(default_factory=list)
    taps: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(vars(self).values())

    def report(self) -> str:
        lines = []
        for kind, items in vars(self).items():
            if items:
                lines.append(f"  leaked {kind}:")
                lines += [f"    {item}" for item in items]
        return "\n".join(lines)


def _roots(snap: Snapshot) -> list[str]:
    return [*snap.scope, snap.kata_state_dir]


def _unix_sockets(roots: list[str]) -> set[str]:
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    paths = {f[7] for f in (line.split() for line in lines) if len(f) >= 8}
    return {p for p in paths if any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)}


def _sandboxes(kata_state_dir: str) -> set[str]:
    sbs = Path(kata_state_dir) / "sbs"
    return {str(p) for p in sbs.iterdir()} if sbs.is_dir() else set()


def _taps(pattern: str) -> set[str]:
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return set()
    return {n for n in names if re.search(pattern, n)}


def _scoped_pids(snap: Snapshot) -> list[procs.Proc]:
    return procs.matching(PROCESS_PATTERNS, scope=_roots(snap))


def snapshot(cd: Containerd | None = None, kata_state_dir: str = KATA_STATE_DIR,
             tap_pattern: str = TAP_PATTERN) -> Snapshot:
    """Record what exists now, so that only what a test adds counts as a leak."""
    scope = (str(cd.dir), cd.address) if cd is not None else ()
    snap = Snapshot(kata_state_dir, scope, cd, tap_pattern)
    roots = _roots(snap)
    return Snapshot(
        kata_state_dir, scope, cd, tap_pattern,
        pids=frozenset(p.pid for p in procs.matching(PROCESS_PATTERNS)),
        mounts=frozenset(mounts.mounts_under(roots)),
        sockets=frozenset(_unix_sockets(roots)),
        sandboxes=frozenset(_sandboxes(kata_state_dir)),
        taps=frozenset(_taps(tap_pattern)),
    )


def find_leaks(before: Snapshot, check_containers: bool = True) -> Leaks:
    roots = _roots(before)
    leaks = Leaks(
        processes=[f"pid {p.pid}: {p.cmdline[:300]}" for p in _scoped_pids(before)
                   if p.pid not in before.pids],
        mounts=sorted(set(mounts.mounts_under(roots)) - before.mounts),
        sockets=sorted(_unix_sockets(roots) - before.sockets),
        sandboxes=sorted(_sandboxes(before.kata_state_dir) - before.sandboxes),
        taps=sorted(_taps(before.tap_pattern) - before.taps),
    )
    cd = before.containerd
    if cd is not None:
        leaks.sockets += [f"{s} (shim socket)" for s in cd.shim_sockets()]
        leaks.sandboxes += [f"{s} (runc state)" for s in cd.runc_state()]
        if check_containers and cd.proc is not None and cd.proc.poll() is None:
            leaks.containers = [f"container {c}" for c in cd.containers()]
            leaks.containers += [f"task {t} ({s})" for t, s in cd.tasks().items()]
    return leaks


def assert_no_leaks(before: Snapshot, timeout: float = 30.0,
                    check_containers: bool = True) -> None:
    """Fail with a list of what leaked, after giving asynchronous cleanup `timeout` s."""
    leaks = procs.wait_until(lambda: not find_leaks(before, check_containers), timeout,
                             interval=0.25)
    if leaks:
        return
    found = find_leaks(before, check_containers)
    if found:
        raise AssertionError(f"resources left behind (after waiting {timeout:.0f}s):\n"
                             f"{found.report()}")
