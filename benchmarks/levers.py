"""QEMU levers measured before and after: TCG tb-size, free page reporting, firmware.

    sudo .venv/bin/python -m benchmarks.levers tb-size   [-n 5] [--values 0,32,64,128]
    sudo .venv/bin/python -m benchmarks.levers reporting [-n 5] [--alloc-mib 300]
    sudo .venv/bin/python -m benchmarks.levers firmware  [-n 5]
    sudo .venv/bin/python -m benchmarks.levers defaults  [-n 5]   (shipped vs QEMU's own)
    sudo .venv/bin/python -m benchmarks.levers grid      [-n 5]   (tb-size x reporting)
    sudo .venv/bin/python -m benchmarks.levers init-on-alloc [-n 5] (the guest zeroing or not)
    sudo .venv/bin/python -m benchmarks.levers root-image [-n 5]  (shared image vs initrd)
    sudo .venv/bin/python -m benchmarks.levers kernel [-n 5]  (ELF vmlinux vs bzImage)

One private containerd, the default runtime (q35, configuration.toml with the test
settings) and a 2048 MiB guest. Each round runs every variant once, in turn (interleaved,
so host noise falls on all alike; each round starts one variant further); the variant is
a ``[hypervisor.qemu]`` override written before its turn (the shim reads the
configuration at every start). Per variant and round:

* cold ``ctr run --rm busybox true``: wall time and the shim's ``boot_seconds``;
* an idle ``sleep`` container (skipped with ``--no-idle``): after ``--settle`` seconds,
  QEMU's RSS and PSS, the RSS of its TCG code buffer (its rwx mappings), and the drop in the
  host's ``MemAvailable`` since before the pod started; with ``--alloc-mib`` the container
  then allocates and frees that much (``dd bs=<N>M count=1``), and the same figures are
  taken again ``--settle`` seconds later (``after-free``).

Medians are printed, and every sample as JSON with ``--json FILE``. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.e2e_latency import shim_boot_seconds
from benchmarks.machines import report
from benchmarks.measure import cpu_ticks, memory_kib
from tests.harness import kataconfig
from tests.harness.kata import Kata, kata_containerd
from tests.harness.scenarios import KATA, explain, remove, run_detached, run_rm

Samples = dict[str, dict[str, list[float]]]
QBOOT = "/usr/share/qemu/qboot.rom"
LEVERS: dict[str, str] = {
    "tb-size": "tcg_tb_size_mib",
    "reporting": "reclaim_guest_freed_memory",
    "firmware": "firmware",
    "defaults": "",  # the shipped configuration against QEMU's own defaults for all three
    "grid": "",  # tb-size 0/64 x free page reporting off/on
    # Under TCG the host adds init_on_alloc=0; the base's kernel_params + "=1" undo it.
    "init-on-alloc": "kernel_params",
    "root-image": "image",  # the shared read-only root image against the whole initrd
    "kernel": "kernel",  # the uncompressed ELF kernel (PVH entry) against the bzImage
}


def variants(lever: str, values: str) -> dict[str, dict[str, Any]]:
    """{variant name: the [hypervisor.qemu] settings that make it}."""
    key = LEVERS[lever]
    if lever == "defaults":
        return {"qemu's": {"firmware": "", "tcg_tb_size_mib": 0,
                           "reclaim_guest_freed_memory": False}, "shipped": {}}
    if lever == "grid":
        return {f"tb{tb}-fpr{'on' if on else 'off'}": {"tcg_tb_size_mib": tb,
                                                      "reclaim_guest_freed_memory": on}
                for on in (False, True) for tb in (0, 64)}
    if lever == "tb-size":
        return {f"tb={v or 'default'}": {key: int(v)} for v in values.split(",")}
    if lever == "reporting":
        return {"off": {key: False}, "on": {key: True}}
    if lever == "init-on-alloc":
        return {"zeroing": {key: f"{kataconfig.BASE_HYPERVISOR[key]} init_on_alloc=1"},
                "no zeroing": {}}
    if lever == "root-image":
        guest = kataconfig.GUEST_DIR
        return {"image": {key: str(guest / "rootfs.img"),
                          "initrd": str(guest / "rootfs-loader.img")},
                "initrd": {key: "", "initrd": str(guest / "initrd.img")}}
    if lever == "kernel":
        guest = kataconfig.GUEST_DIR
        return {"vmlinux": {key: str(guest / "vmlinux")},
                "vmlinuz": {key: str(guest / "vmlinuz")}}
    return {"seabios": {key: ""}, "qboot": {key: QBOOT}}


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def code_buffer_rss_kib(pid: int) -> int:
    """RSS of QEMU's writable+executable mappings: TCG's translation cache."""
    total, rwx = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) > 1 and len(head[1]) == 4:
                    rwx = head[1].startswith("rwx")
                elif rwx and head[0] == "Rss:":
                    total += int(head[1])
    except OSError:
        return 0
    return total


def qemu_figures(kata: Kata, base_avail: int) -> dict[str, float]:
    """QEMU RSS/PSS/code buffer and the MemAvailable drop (MiB), QEMU's CPU time (s)."""
    pids = [p.pid for p in kata.qemu_processes()]
    if len(pids) != 1:
        raise SystemExit(f"expected one QEMU, found {pids}")
    rss, pss = memory_kib(pids[0])
    return {"qemu RSS MiB": rss / 1024, "qemu PSS MiB": pss / 1024,
            "tcg buffer RSS MiB": code_buffer_rss_kib(pids[0]) / 1024,
            "MemAvailable drop MiB": (base_avail - mem_available_kib()) / 1024,
            # CPU time: less noisy than wall time on a busy host
            "qemu CPU s": cpu_ticks(pids[0]) / os.sysconf("SC_CLK_TCK")}


def cold_run(kata: Kata, cid: str) -> float:
    start = time.monotonic()
    res = run_rm(kata.cd, KATA, cid, "true")
    if res.returncode != 0:
        raise SystemExit(f"cold run {cid} failed:\n{explain(res)}")
    return time.monotonic() - start


def idle_pod(kata: Kata, cid: str, settle: float, alloc_mib: int) -> dict[str, float]:
    """Figures of an idle pod, and after it allocated and freed `alloc_mib`."""
    base = mem_available_kib()
    run_detached(kata.cd, KATA, cid, "sleep", "600")
    try:
        time.sleep(settle)
        found = {f"idle {k}": v for k, v in qemu_figures(kata, base).items()}
        if alloc_mib:
            res = kata.cd.ctr("task", "exec", "--exec-id", "alloc", cid, "dd",
                              f"bs={alloc_mib}M", "count=1", "if=/dev/zero", "of=/dev/null",
                              timeout=120)
            if res.returncode != 0:
                raise SystemExit(f"dd in {cid} failed:\n{explain(res)}")
            found.update({f"right after dd {k}": v
                          for k, v in qemu_figures(kata, base).items()})
            time.sleep(settle)
            found.update({f"after-free {k}": v for k, v in qemu_figures(kata, base).items()})
        return found
    finally:
        remove(kata.cd, cid)


def measure(lever: str, args: argparse.Namespace) -> Samples:
    results: Samples = {}
    chosen = variants(lever, args.values)
    with kata_containerd() as kata:
        names = list(chosen)
        for i in range(args.n):
            # Each round starts at another variant: no variant always follows the same one.
            for name in names[i % len(names):] + names[:i % len(names)]:
                settings = chosen[name]
                series = results.setdefault(name, defaultdict(list))
                kata.write_config({"hypervisor.qemu": {"default_memory": args.memory,
                                                       **settings}})
                tag = _tag(name)
                series["cold run wall s"].append(cold_run(kata, f"bench-{tag}-cold-{i}"))
                if not args.no_idle:
                    figures = idle_pod(kata, f"bench-{tag}-idle-{i}", args.settle,
                                       args.alloc_mib)
                    for key, value in figures.items():
                        series[key].append(value)
        booted = shim_boot_seconds(kata)
    for name in chosen:
        tag = _tag(name)
        for kind in ("cold", "idle"):
            secs = [s for sid, s in booted.items() if sid.startswith(f"bench-{tag}-{kind}-")]
            if secs:
                results[name][f"{kind} boot_seconds"] = secs
    return results


def _tag(variant: str) -> str:
    """A variant's name as it may appear in a container id."""
    return "".join(c for c in variant if c.isalnum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("lever", choices=list(LEVERS))
    ap.add_argument("-n", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--memory", type=int, default=2048, help="VM MiB (default 2048)")
    ap.add_argument("--values", default="0,32,64,128", help="tb-size MiB values, 0 = QEMU's")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds before sampling")
    ap.add_argument("--alloc-mib", type=int, default=0, help="dd this much in the pod")
    ap.add_argument("--no-idle", action="store_true", help="cold runs only")
    ap.add_argument("--json", type=Path, help="write every sample here")
    args = ap.parse_args(argv)
    results = measure(args.lever, args)
    report(results, key_width=36)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
