"""The measuring instruments of `benchmarks.suite`: host memory, process CPU, timed ctr calls.

Each reads /proc or times one command; none decides what a figure is (`benchmarks.suite`).
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from collections.abc import Iterable

from tests.harness import procs
from tests.harness.containerd import Containerd
from tests.harness.pty import set_winsize
from tests.harness.scenarios import BOOT_TIMEOUT, explain

#: Process roles of one pod on the host, by what their program's name contains (not the
#: whole command line: QEMU's names virtiofsd's socket).
ROLES = {"shim": "containerd-shim", "vmm": "qemu-system", "virtiofsd": "virtiofsd"}


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of a process in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        pass
    return rss, pss


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` itself (not its waited-for children); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def role_pids(cd: Containerd) -> dict[str, list[int]]:
    """The pids of each role serving this containerd's containers (shim daemons only)."""
    scope = [str(cd.dir), cd.address]
    return {role: [p.pid for p in procs.matching([pattern], scope=scope)
                   if p.argv[-1] not in ("start", "delete") and _program_is(p, pattern)]
            for role, pattern in ROLES.items()}


def _program_is(proc: procs.Proc, pattern: str) -> bool:
    """Whether the program (argv[0], or the script a Python shim runs) is `pattern`'s."""
    program = proc.argv[1] if "python" in proc.argv[0].rsplit("/", 1)[-1] else proc.argv[0]
    return pattern in program.rsplit("/", 1)[-1]


def pss_mib(pids: Iterable[int]) -> float:
    return sum(memory_kib(pid)[1] for pid in pids) / 1024


class ShimCpu(threading.Thread):
    """CPU seconds the shim processes of `cd` used while the block ran.

    Polls every `interval` s and keeps each pid's last reading, so a process's time after
    its last poll is missed: a lower bound by at most one interval per process, the same
    for every runtime. Shims already running count only what they used in the block.
    (Their waited-for children, such as QEMU, are not counted.)"""

    def __init__(self, cd: Containerd, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.cd, self.interval = cd, interval
        self.first: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.done = threading.Event()

    def _shims(self) -> set[int]:
        scope = [str(self.cd.dir), self.cd.address]
        return {p.pid for p in procs.matching(["containerd-shim"], scope=scope)
                if _program_is(p, "containerd-shim")}

    def run(self) -> None:
        known = set(self.first)
        rescan = 0
        while not self.done.is_set():
            if rescan == 0:  # a /proc scan is costly: look for new shims every 3rd poll
                known |= self._shims()
            rescan = (rescan + 1) % 3
            for pid in known:
                if ticks := cpu_ticks(pid):
                    self.last[pid] = ticks
            self.done.wait(self.interval)

    def __enter__(self) -> ShimCpu:
        self.first = {pid: cpu_ticks(pid) for pid in self._shims()}
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()

    @property
    def seconds(self) -> float:
        used = sum(t - self.first.get(pid, 0) for pid, t in self.last.items())
        return used / os.sysconf("SC_CLK_TCK")


def timed_ctr(cd: Containerd, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Seconds one `ctr` call took, and its result (a failure raises, with its output)."""
    start = time.monotonic()
    res = cd.ctr(*args, timeout=BOOT_TIMEOUT)
    took = time.monotonic() - start
    if res.returncode != 0:
        raise RuntimeError(explain(res))
    return took, res


def timed_tty_exec(cd: Containerd, cid: str, exec_id: str, script: str) -> tuple[float, int]:
    """Seconds `ctr task exec -t ... sh -c script` took on a pty, and the bytes it printed."""
    master, slave = os.openpty()
    set_winsize(slave, 24, 80)
    argv = cd.ctr_argv("task", "exec", "-t", "--exec-id", exec_id, cid, "sh", "-c", script)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=cd.env,
                                start_new_session=True)
    finally:
        os.close(slave)
    total = 0
    try:
        while True:
            ready, _, _ = select.select([master], [], [], BOOT_TIMEOUT)
            if not ready:
                raise RuntimeError(f"{argv}: no output for {BOOT_TIMEOUT}s")
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the pty's last slave closed, ctr is done
                break
            if not data:
                break
            total += len(data)
        rc = proc.wait(BOOT_TIMEOUT)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    if rc != 0:
        raise RuntimeError(f"{argv} exited {rc}")
    return took, total
