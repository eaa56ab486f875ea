"""QEMU machine types side by side: q35 against microvm (and runc as the floor), one run.

    sudo .venv/bin/python -m benchmarks.machines [-n 5] [--memory 512]

One private containerd; the default runtime runs q35 (configuration.toml) and the variant
io.containerd.kata-qemu-microvm.v2 runs microvm (configuration-qemu-microvm.toml), both with
the test settings (the built guest, TCG allowed, ``--memory`` MiB). Rounds interleave the
runtimes, so host noise falls on all of them alike. Per round and runtime:

* ``ctr run --rm ... uname -r``: wall time, and the VM boot the shim logged
  (``boot_seconds``: QEMU spawned -> agent answering);
* a ``sleep`` container: RSS and PSS of the VMM, virtiofsd and the shim while it runs.

Medians are printed. Not part of `make test` (which runs one round of runc and microvm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping

from benchmarks.e2e_latency import shim_boot_seconds
from benchmarks.footprint import sample
from tests.harness.kata import Kata, kata_containerd
from tests.harness.kataconfig import REPO
from tests.harness.scenarios import KATA, RUNC, explain, run_rm

MICROVM = "io.containerd.kata-qemu-microvm.v2"
RUNTIMES = {"runc": RUNC, "q35": KATA, "microvm": MICROVM}


def one_round(kata: Kata, i: int, results: dict[str, dict[str, list[float]]]) -> None:
    """One run of each runtime in `results` (names of `RUNTIMES`), in turn."""
    for name in results:
        runtime = RUNTIMES[name]
        cid = f"bench-{name}-{i}"
        start = time.monotonic()
        res = run_rm(kata.cd, runtime, cid, "uname", "-r")
        if res.returncode != 0:
            raise SystemExit(f"{name} run {i} failed:\n{explain(res)}")
        results[name]["wall s"].append(time.monotonic() - start)
        for role, (rss, pss) in sample(kata, runtime, f"mem-{name}-{i}").items():
            results[name][f"{role} RSS MiB"].append(rss / 1024)
            results[name][f"{role} PSS MiB"].append(pss / 1024)


def report(results: Mapping[str, Mapping[str, list[float]]], key_width: int = 20) -> None:
    """A table of medians: a row per figure, a column per runtime (or variant)."""
    keys = sorted({k for r in results.values() for k in r})
    print(f"{'':<{key_width}}" + "".join(f"{name:>12}" for name in results) + "   (median)")
    for key in keys:
        cells = []
        for series in results.values():
            values = series.get(key, [])
            cells.append(f"{statistics.median(values):>12.2f}" if values else f"{'-':>12}")
        n = max(len(s.get(key, [])) for s in results.values())
        print(f"{key:<{key_width}}" + "".join(cells) + f"   n={n}")


def measure(n: int, memory_mib: int,
            runtimes: Iterable[str] = RUNTIMES) -> dict[str, dict[str, list[float]]]:
    """{runtime: {figure: values}} over `n` interleaved rounds of `runtimes` (names of
    `RUNTIMES`; all by default)."""
    results: dict[str, dict[str, list[float]]] = {
        name: defaultdict(list) for name in runtimes}
    if unknown := results.keys() - RUNTIMES.keys():
        raise ValueError(f"unknown runtimes {sorted(unknown)}, not in {list(RUNTIMES)}")
    with kata_containerd() as kata:
        overrides = {"hypervisor.qemu": {"default_memory": memory_mib}}
        kata.write_config(overrides)
        kata.write_variant_config("qemu-microvm", REPO / "configuration-qemu-microvm.toml",
                                  overrides)
        for i in range(n):
            one_round(kata, i, results)
        booted = shim_boot_seconds(kata)
    for name in results.keys() - {"runc"}:
        results[name]["VM boot s (shim)"] = [
            secs for sid, secs in booted.items() if sid.startswith(f"bench-{name}-")]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--memory", type=int, default=512, help="VM MiB (default 512)")
    args = ap.parse_args(argv)
    report(measure(args.n, args.memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
