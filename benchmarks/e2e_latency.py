"""End-to-end latency of `ctr run --rm ... uname -r`: runc vs kata, same private containerd.

    sudo .venv/bin/python -m benchmarks.e2e_latency [-n 5] [--runtime runc|kata|both]

For kata, the guest's boot timing is read from the sandbox's console.log (kernel printk
timestamps, and the `uptime` the guest init/agent print). That file lives only while the
sandbox runs, so a watcher thread copies it while `ctr run` is in flight. Not part of
`make test`.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import threading
import time
from pathlib import Path

from tests.harness.kata import Kata, kata_containerd
from tests.harness.scenarios import KATA, RUNC, explain, run_rm

RUNTIMES = {"runc": RUNC, "kata": KATA}
ANSI = re.compile(rb"\x1b(?:\[[0-9;?]*[A-Za-z]|[A-Za-z])")
KERNEL_TS = re.compile(rb"^\[\s*(\d+\.\d+)\]", re.M)
UPTIME = re.compile(rb"([\w-]+)[^\n|]*?uptime (\d+\.\d+)s")
# The shim's own measure of the VM boot: QEMU spawned -> agent answering -> sandbox created.
SHIM_BOOT = re.compile(r'msg="sandbox started" sandbox=(bench-[\w-]+) .*?boot_seconds=(\d+\.\d+)')


class ConsoleWatcher(threading.Thread):
    """Keep copies of every console.log under `sbs` while it exists."""

    def __init__(self, sbs: Path) -> None:
        super().__init__(daemon=True)
        self.sbs, self.done = sbs, threading.Event()
        self.copies: dict[str, bytes] = {}

    def run(self) -> None:
        while not self.done.wait(0.05):
            for log in self.sbs.glob("*/console.log"):
                with contextlib.suppress(OSError):
                    self.copies[str(log)] = log.read_bytes()


def boot_times(console: bytes) -> dict[str, float]:
    """Guest-side milestones (seconds of guest uptime) found in a console log."""
    found: dict[str, float] = {}
    console = ANSI.sub(b"", console)  # SeaBIOS clears the screen with escape sequences
    kernel = [float(t) for t in KERNEL_TS.findall(console)]
    if kernel:
        found["last kernel message"] = kernel[-1]
    for name, secs in UPTIME.findall(console):
        found[f"{name.decode()} (uptime)"] = float(secs)
    return found


def time_runs(kata: Kata, runtime: str, n: int) -> tuple[list[float], list[dict[str, float]]]:
    walls, boots = [], []
    for i in range(n):
        watcher = ConsoleWatcher(kata.state_dir / "sbs")
        watcher.start()
        start = time.monotonic()
        res = run_rm(kata.cd, runtime, f"bench-{i}", "uname", "-r")
        walls.append(time.monotonic() - start)
        watcher.done.set()
        watcher.join()
        if res.returncode != 0:
            raise SystemExit(f"{runtime} run {i} failed:\n{explain(res)}")
        boots += [boot_times(c) for c in watcher.copies.values()]
    return walls, boots


def shim_boot_seconds(kata: Kata) -> dict[str, float]:
    """Per sandbox id, the VM boot time the shim logged (containerd keeps the shim's log)."""
    text = kata.cd.log_path.read_text(errors="replace")
    return {sid: float(secs) for sid, secs in SHIM_BOOT.findall(text)}


def report(results: dict[str, list[float]], boots: list[dict[str, float]],
           shim_boots: list[float]) -> None:
    print(f"{'runtime':<24}{'min':>9}{'median':>9}{'max':>9}   (wall time, s)")
    for runtime, walls in results.items():
        print(f"{runtime:<24}{min(walls):>9.3f}{statistics.median(walls):>9.3f}"
              f"{max(walls):>9.3f}   n={len(walls)}")
    if shim_boots:
        print(f"\nkata VM boot as the shim measured it (QEMU start -> agent ready -> sandbox "
              f"created): min {min(shim_boots):.2f}  median {statistics.median(shim_boots):.2f}"
              f"  max {max(shim_boots):.2f} s  n={len(shim_boots)}")
    if boots:
        print("\nkata guest boot (median of guest uptime at each milestone):")
        for key in sorted({k for b in boots for k in b}):
            values = [b[key] for b in boots if key in b]
            print(f"  {key:<40}{statistics.median(values):>8.2f} s")
    elif KATA in results:
        print("\n(no console.log seen: boot timing unavailable; see the shim's log lines)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="runs per runtime (default 5)")
    ap.add_argument("--runtime", choices=["runc", "kata", "both"], default="both")
    args = ap.parse_args(argv)
    chosen = list(RUNTIMES) if args.runtime == "both" else [args.runtime]
    results: dict[str, list[float]] = {}
    boots: list[dict[str, float]] = []
    shim_boots: list[float] = []
    with kata_containerd() as kata:
        for name in chosen:
            walls, b = time_runs(kata, RUNTIMES[name], args.n)
            results[RUNTIMES[name]] = walls
            boots += b if name == "kata" else []
        shim_boots = list(shim_boot_seconds(kata).values())
    report(results, boots, shim_boots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
