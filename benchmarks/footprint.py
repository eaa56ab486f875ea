"""Host memory of one running container: runc shim vs kata shim (+ its QEMU and virtiofsd).

    sudo .venv/bin/python -m benchmarks.footprint [-n 3]

For each runtime, starts `ctr run -d busybox sleep 300` in one private containerd, waits
until it runs, then reads VmRSS and Pss (from /proc/<pid>/smaps_rollup) of the processes
that serve it: the shim daemon, and for kata also QEMU and virtiofsd. Pss splits shared
pages fairly between processes, so it is the better measure of what one more pod costs.
Not part of `make test`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks.measure import ROLES, memory_kib, role_pids
from tests.harness.kata import Kata, kata_containerd
from tests.harness.scenarios import KATA, RUNC, remove, run_detached


@contextmanager
def running(kata: Kata, runtime: str, cid: str) -> Iterator[None]:
    run_detached(kata.cd, runtime, cid, "sleep", "300")
    try:
        yield
    finally:
        remove(kata.cd, cid)


def sample(kata: Kata, runtime: str, cid: str) -> dict[str, tuple[int, int]]:
    """Memory per role (summed over that role's processes) while `cid` runs."""
    with running(kata, runtime, cid):
        found: dict[str, tuple[int, int]] = {}
        for role, pids in role_pids(kata.cd).items():
            if pids:
                mems = [memory_kib(pid) for pid in pids]
                found[role] = (sum(m[0] for m in mems), sum(m[1] for m in mems))
        return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3, help="containers per runtime (default 3)")
    args = ap.parse_args(argv)
    results: dict[str, list[dict[str, tuple[int, int]]]] = {RUNC: [], KATA: []}
    with kata_containerd() as kata:
        for runtime in results:
            for i in range(args.n):
                results[runtime].append(sample(kata, runtime, f"mem-{i}"))
    print(f"{'runtime':<24}{'process':<12}{'RSS MiB':>10}{'PSS MiB':>10}   (median of n)")
    for runtime, samples in results.items():
        for role in ROLES:
            values = [s[role] for s in samples if role in s]
            if values:
                rss = statistics.median(v[0] for v in values) / 1024
                pss = statistics.median(v[1] for v in values) / 1024
                print(f"{runtime:<24}{role:<12}{rss:>10.1f}{pss:>10.1f}   n={len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
