"""The shim's `start` and `delete` and its daemon's memory: frozen vs source vs runc's shim.

    sudo .venv/bin/python -m benchmarks.shim_forms [-n 10] [-m 2] [--frozen PATH]

containerd runs `<shim> start` (which must hand back a serving daemon) and `<shim> delete`
for every container, so their wall time is paid per container. In one private containerd,
rounds interleave three shims: containerd's runc shim, this shim from the source tree
(`.venv/bin/containerd-shim-kata-v2`, Python from the venv) and the frozen one (`make
runtime`, or an installed `/usr/local/bin/containerd-shim-kata-v2`). Each round runs, in a
scratch bundle, exactly what containerd runs: `start` (timed until it prints the address),
the daemon's RSS/PSS while idle, SIGKILL of the daemon (containerd also runs `delete` after
a shim dies), then `delete` (timed). Then `-m` containers per kata form (and runc) run
`sleep` through `ctr run --runtime <shim path>` while the daemon's memory is read (the
footprint benchmark's sampling). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.footprint import sample
from benchmarks.measure import memory_kib
from tests.harness import procs
from tests.harness.containerd import REPO, VENV_BIN, shim_socket
from tests.harness.kata import Kata, kata_containerd

FROZEN_BUILD = REPO / "build/out/runtime/kata-py/bin/containerd-shim-kata-v2"
FROZEN_INSTALLED = Path("/usr/local/bin/containerd-shim-kata-v2")
SPEC = {"ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/"}, "annotations": {}}


def forms(frozen: Path) -> dict[str, Path]:
    runc = shutil.which("containerd-shim-runc-v2")
    if runc is None:
        raise SystemExit("containerd-shim-runc-v2 not found (make deps)")
    return {"runc shim": Path(runc), "kata, source (.venv)": VENV_BIN / "containerd-shim-kata-v2",
            "kata, frozen": frozen}


def shim_argv(shim: Path, kata: Kata, cid: str, action: str) -> list[str]:
    return [str(shim), "-namespace", kata.cd.namespace, "-address", kata.cd.address,
            "-publish-binary", shutil.which("containerd") or "containerd", "-id", cid, action]


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    procs.wait_until(lambda: not procs.alive(pid), timeout=timeout, interval=0.01)


def daemon_pid(kata: Kata, cid: str) -> int:
    """The daemon `start` left serving `cid` (the runc shim writes no shim.pid)."""
    def find() -> list[procs.Proc]:
        return [p for p in procs.matching([f"-id {cid} "], scope=[kata.cd.address])
                if p.argv[-1] not in ("start", "delete")]

    found = procs.wait_until(find, timeout=10, interval=0.01)
    if len(found) != 1:
        raise SystemExit(f"{cid}: expected one shim daemon, found {found}")
    return found[0].pid


def one_cycle(kata: Kata, shim: Path, cid: str) -> tuple[float, float, tuple[int, int]]:
    """(start seconds, delete seconds, idle daemon (RSS, PSS) KiB) of one scratch bundle."""
    bundle = kata.cd.dir / "bundles" / cid
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(SPEC))
    # containerd creates the bundle's `log` FIFO and reads it before it runs `start`: the
    # runc shim's daemon exits when it cannot open it.
    os.mkfifo(bundle / "log", 0o600)
    (bundle / "runtime").write_text("runc")  # the runc shim's Create writes it; delete reads it
    log_reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return _timed_cycle(kata, shim, cid, bundle)
    finally:
        os.close(log_reader)
        shutil.rmtree(bundle)


def _timed_cycle(kata: Kata, shim: Path, cid: str,
                 bundle: Path) -> tuple[float, float, tuple[int, int]]:
    env = {**kata.cd.env, "TTRPC_ADDRESS": f"{kata.cd.address}.ttrpc"}
    t0 = time.monotonic()
    res = subprocess.run(shim_argv(shim, kata, cid, "start"), cwd=bundle, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    started = time.monotonic() - t0
    if res.returncode != 0 or not res.stdout.startswith("unix://"):
        raise SystemExit(f"{shim} start failed ({res.returncode}): {res.stdout}{res.stderr}")
    pid = daemon_pid(kata, cid)
    time.sleep(0.5)  # let the daemon settle (imports done, serving)
    memory = memory_kib(pid)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    t0 = time.monotonic()
    res = subprocess.run(shim_argv(shim, kata, cid, "delete"), cwd=bundle, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    deleted = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"{shim} delete failed ({res.returncode}): {res.stderr!r}")
    shim_socket(kata.cd.address, kata.cd.namespace, cid).unlink(missing_ok=True)
    return started, deleted, memory


def describe(values: list[float], unit: str, scale: float) -> str:
    return (f"{min(values) * scale:>8.1f}{statistics.median(values) * scale:>8.1f}"
            f"{max(values) * scale:>8.1f} {unit}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10, help="start/delete cycles per shim")
    ap.add_argument("-m", type=int, default=2, help="running containers sampled per shim")
    default = FROZEN_INSTALLED if FROZEN_INSTALLED.exists() else FROZEN_BUILD
    ap.add_argument("--frozen", type=Path, default=default,
                    help=f"the frozen shim (default {default})")
    args = ap.parse_args(argv)
    chosen = forms(args.frozen)
    cycles: dict[str, list[tuple[float, float, tuple[int, int]]]] = {f: [] for f in chosen}
    running: dict[str, list[tuple[int, int]]] = {f: [] for f in chosen}
    with kata_containerd() as kata:
        for i in range(args.n):
            for k, (form, shim) in enumerate(chosen.items()):
                cycles[form].append(one_cycle(kata, shim, f"act-{k}-{i}"))
        for i in range(args.m):
            for k, (form, shim) in enumerate(chosen.items()):
                found = sample(kata, str(shim), f"mem-{k}-{i}")
                if "shim" in found:
                    running[form].append(found["shim"])
    print(f"{'shim':<24}{'action':<28}{'min':>8}{'median':>8}{'max':>8}")
    for form, results in cycles.items():
        print(f"{form:<24}{'start':<28}{describe([r[0] for r in results], 'ms', 1e3)}")
        print(f"{'':<24}{'delete':<28}{describe([r[1] for r in results], 'ms', 1e3)}")
        for label, mems in (("daemon idle", [r[2] for r in results]),
                            ("daemon, container running", running[form])):
            for j, kind in enumerate(("RSS", "PSS") if mems else ()):
                values = describe([m[j] for m in mems], "MiB", 1 / 1024)
                print(f"{'':<24}{label + ' ' + kind:<28}{values}")
    print(f"(n={args.n} start/delete cycles, m={args.m} running containers per shim; "
          f"frozen = {args.frozen})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
