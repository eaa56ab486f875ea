"""`make bench`: every figure of docs/performance.md, our runtime beside runc, in one run.

    sudo .venv/bin/python -m benchmarks.suite [--quick] [--out build/out/bench] [--doc FILE]

One private containerd (with its CRI plugin) runs both ``io.containerd.runc.v2`` and ours
(``io.containerd.kata.v2``; CRI handlers ``runc`` and ``kata``), the test guest, a
2048 MiB VM (Kata's default). Runs of the two runtimes interleave, so host noise falls on
both. Figures (issue 11): cold run with its phase breakdown, the boot floor, runs whose VM
is restored from a VM template against cold runs of the same configuration, CRI pod start,
pods started at once, host memory per pod, shim cost, exec latency, stdout throughput.
Every sample goes to ``<out>/bench-<time>.json`` (`benchmarks.results`), with a chart
(``.png``) and the Markdown table (``.md``); ``--doc`` rewrites the table in that file.
`--quick` is the short form `make test` runs to prove the bench works; never timed tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks import floor, results
from benchmarks.measure import (
    ShimCpu,
    mem_available_mib,
    pss_mib,
    role_pids,
    timed_ctr,
    timed_tty_exec,
)
from benchmarks.phases import breakdown, shim_events
from cli.metrics import fetch, find_socket
from hypervisors.qemu.args import VmParams
from hypervisors.qemu.template import refusal
from hypervisors.statepaths import StatePaths
from tests.harness import kataconfig
from tests.harness.containerd import RUNTIME_BIN
from tests.harness.cri.client import Kubelet
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, Kata, kata_cri_containerd
from tests.harness.kataconfig import REPO
from tests.harness.scenarios import KATA, RUNC, explain, remove

RUNTIMES = {"runc": RUNC, "kata": KATA}
HANDLERS = {"runc": "runc", "kata": CRI_HANDLER}
GUEST_MEMORY_MIB = 2048
ACCEL = re.compile(r'msg="sandbox started" .*?accelerator=(\w+)')
#: What the chart shows: one panel per figure.
CHART = {"cold run": "wall s", "VM template": "restored: wall s",
         "CRI pod start": "pod running s", "exec": "exec true s",
         "memory, 1 pod": "PSS per pod MiB", "shim": "CPU s per lifecycle"}


@dataclass(frozen=True)
class Plan:
    """How many samples of each figure."""

    cold: int = 10
    floor: int = 5
    template: int = 5  # rounds of one cold run and one restored from the VM template
    cri: int = 5
    singles: int = 3
    parallel: int = 8
    lifecycles: int = 5
    execs: int = 10
    #: Bytes ours prints through a tty for the stdout figure; pipes carry `RUNC_STDOUT_SCALE`
    #: times more, and runc's tty too (`stdout_sizes`).
    stdout_bytes: int = 1 << 20  # ~10 s through a tty under TCG here
    settle: float = 10.0


RUNC_STDOUT_SCALE = 16
TEMPLATE_MEMORY_SLOTS = 2
#: `make test`'s proof that every figure is taken: one sample each (each kata one is a VM
#: boot, ~10 s under TCG), 2 pods at once for the parallel path, 64 KiB through the tty.
QUICK = Plan(cold=1, floor=1, template=1, cri=1, singles=1, parallel=2, lifecycles=1, execs=1,
             stdout_bytes=64 << 10, settle=1.0)
Figures = dict[str, dict[str, dict[str, list[float]]]]


def run_argv(kata: Kata, name: str, *flags: str) -> list[str]:
    """`ctr run` arguments up to the image for runtime `name` (ours gets the bench's
    configuration file as its runtime options' ConfigPath, as a CRI handler does)."""
    extra = ["--runtime-config-path", str(kata.config_path)] if name == "kata" else []
    return ["run", *flags, "--runtime", RUNTIMES[name], *extra, IMAGE_REF]


def cold_runs(kata: Kata, plan: Plan, figs: Figures) -> None:
    """(1) `ctr run --rm busybox true`, and where our runtime's time went."""
    fig, timed = figs["cold run"], []
    for i in range(plan.cold):
        for name in RUNTIMES:
            cid = f"cold-{name}-{i}"
            started = time.time()
            timed_ctr(kata.cd, *run_argv(kata, name, "--rm"), cid, "true")
            ended = time.time()
            fig[name]["wall s"].append(ended - started)
            if name == "kata":
                timed.append((cid, started, ended))
    time.sleep(0.5)  # the shim's last lines reach containerd's log asynchronously
    lines = kata.cd.log_path.read_text(errors="replace").splitlines()
    for cid, started, ended in timed:
        for phase, secs in breakdown(started, ended, shim_events(lines, cid)).items():
            fig["kata"][f"{phase} s"].append(secs)


def boot_floor(kata: Kata, plan: Plan, figs: Figures) -> None:
    """(2) QEMU with the same kernel, initrd, parameters and memory until /init runs."""
    for _ in range(plan.floor):
        figs["boot floor"]["kata"]["QEMU spawn to /init s"].append(
            floor.seconds_to_init(kata.config_path))


#: The VM templates of figure 2b: (name, memory_slots). "restored" is the configuration
#: configuration.toml advises, the smallest template every pod grows from by hot-plug;
#: "restored, default-size template" has no hot-plug, so the template is the default size
#: and only pods of exactly that size are restored from it.
TEMPLATE_VARIANTS = (("restored", TEMPLATE_MEMORY_SLOTS), ("restored, default-size template", 0))
#: The VM cache's variants of figure 2b, (name, memory_slots): a VM booted ahead by
#: `kata-runtime factory init` with ``vm_cache_number = 1``, taken by the pod. As for
#: templates, with hot-plug the cached VM is the smallest a pod may get and the pod grows
#: it; without, it has the default size.
CACHE_VARIANTS = (("VM cache", TEMPLATE_MEMORY_SLOTS), ("VM cache, default size", 0))
CACHE_READY_TIMEOUT = 300.0


def vm_template(kata: Kata, plan: Plan, figs: Figures, notes: list[str]) -> None:
    """(b) pre-booted VMs: `ctr run --rm busybox true` with the pod's VM restored from a VM
    template (`[factory] enable_template`), each `TEMPLATE_VARIANTS`, interleaved with cold
    runs of the same configuration; and what making the advised template took
    (`kata-runtime factory init`). None where the configuration cannot have templates."""
    refused = template_refusal(kata)
    if refused is not None:
        notes.append(f"VM template: no figure, the configuration cannot have templates: "
                     f"{refused}")
        return
    fig = figs["VM template"]["kata"]
    configs = [(name, *template_config(kata, name, slots)) for name, slots in TEMPLATE_VARIANTS]
    caches = [VmCacheRun(name, template_config(kata, name, slots, cache=True)[0])
              for name, slots in CACHE_VARIANTS]
    runs: list[tuple[str, str, float]] = []
    try:
        for i, (_, config, _) in enumerate(configs):
            made = factory(config, "init")
            if i == 0:
                fig["template boot s"].append(made["boot_seconds"])
                fig["template save s"].append(made["save_seconds"])
                fig["template state MiB"].append(made["state_mib"])
        for cache in caches:
            cache.start()
        for i in range(plan.template):
            order = [("cold", kata.config_path), *((name, path) for name, path, _ in configs),
                     *((c.name, c.config) for c in caches)]
            k = i % len(order)
            for j, (name, path) in enumerate(order[k:] + order[:k]):
                for cache in caches:  # no run is timed while a cache boots a replacement
                    cache.wait_until_full()
                cid, started = f"tpl-{i}-{j}", time.time()
                took, _ = timed_ctr(kata.cd, "run", "--rm", "--runtime", KATA,
                                    "--runtime-config-path", str(path), IMAGE_REF, cid, "true")
                fig[f"{name}: wall s"].append(took)
                runs.append((name, cid, started))
                for cache in caches:
                    cache.taken += name == cache.name
    finally:
        for _, config, _ in configs:
            factory(config, "destroy")
        for cache in caches:
            cache.stop()
    time.sleep(0.5)  # the shim's last lines reach containerd's log asynchronously
    lines = kata.cd.log_path.read_text(errors="replace").splitlines()
    for name, cid, started in runs:  # the pod's start: until its container runs
        events = shim_events(lines, cid)
        if "process started" in events:
            fig[f"{name}: to container started s"].append(events["process started"][0] - started)
    for _, _, template_dir in configs:
        if template_dir.exists():
            raise RuntimeError(f"kata-runtime factory destroy left {template_dir}")
    restored = kata.cd.log_path.read_text(errors="replace").count("restored from the VM template")
    if restored < plan.template * len(configs):
        raise RuntimeError(f"{restored} of {plan.template * len(configs)} pods were restored "
                           "from a template")
    took_cached = kata.cd.log_path.read_text(errors="replace").count("taken from the VM cache")
    if took_cached < plan.template * len(caches):
        raise RuntimeError(f"{took_cached} of {plan.template * len(caches)} pods took a VM "
                           "from a VM cache")


@dataclass
class VmCacheRun:
    """One `kata-runtime factory init` with a VM cache of one, in the background."""

    name: str
    config: Path
    taken: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.config.with_suffix(".log")

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(RUNTIME_BIN / "kata-runtime"), "--config",
                                          str(self.config), "factory", "init"], stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait_until_full(self) -> None:
        """Until every VM pods took has been replaced (the cache's log counts them)."""
        deadline = time.monotonic() + CACHE_READY_TIMEOUT
        while self.log.read_text(errors="replace").count(" ready (") < self.taken + 1:
            if self.proc is None or self.proc.poll() is not None or \
                    time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no VM ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """`factory destroy`, and its exit."""
        if self.proc is None:
            return
        factory(self.config, "destroy")
        if self.proc.wait(60) != 0:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                               f"{self.log.read_text()[-2000:]}")


def template_refusal(kata: Kata) -> str | None:
    """The runtime's reason why the bench's pods cannot come from a template (a microvm
    machine has no PCIe root ports to plug their devices into); None if they can."""
    if not kataconfig.is_qemu():
        return "templates are made by QEMU only"
    pod_vm = VmParams(sandbox_id="bench", paths=StatePaths(kata.state_dir), accelerator="tcg")
    return refusal(pod_vm, kataconfig.BASE_HYPERVISOR.get("machine_type", "q35"))


def template_config(kata: Kata, name: str, memory_slots: int,
                    cache: bool = False) -> tuple[Path, Path]:
    """The bench's configuration with templates on (or with ``cache``, a VM cache of one)
    and ``memory_slots``, beside it, and the template's dir. With memory hot-plug
    (``memory_slots`` > 0, as configuration.toml advises with templates) the template is
    the smallest VM (the base memory) and pods get the rest as a DIMM; without, the
    template has the default size."""
    tag = re.sub(r"[^a-z]+", "-", name.lower()).strip("-")
    template_dir = kata.config_path.parent / f"template-{tag}"
    path = kata.config_path.with_name(f"configuration-{tag}.toml")
    tables = tomllib.loads(kata.config_path.read_text())
    endpoint = kata.state_dir / f"{tag}.sock"
    tables["factory"] = ({"vm_cache_number": 1, "vm_cache_endpoint": str(endpoint)} if cache
                         else {"enable_template": True, "template_path": str(template_dir)})
    for section in tables["hypervisor"].values():
        section["memory_slots"] = memory_slots
        section["use_vsock"] = False  # templates keep the agent on virtio-serial
    path.write_text(kataconfig.dumps(kataconfig.flatten(tables)))
    return path, template_dir


def factory(config: Path, action: str) -> dict[str, Any]:
    """`kata-runtime factory <action> --json`'s answer; a failure raises with its output."""
    res = subprocess.run([str(RUNTIME_BIN / "kata-runtime"), "--config", str(config), "factory",
                          action, "--json"], capture_output=True, text=True, timeout=600,
                         check=False)
    if res.returncode != 0:
        raise RuntimeError(f"kata-runtime factory {action}: {explain(res)}")
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def cri_pod_starts(kata: Kata, plan: Plan, figs: Figures, notes: list[str]) -> None:
    """(3) RunPodSandbox + CreateContainer + StartContainer until the container runs.
    A handler whose pod cannot start is noted and left out (runc's, on some hosts)."""
    fig = figs["CRI pod start"]
    handlers = dict(HANDLERS)
    with Kubelet(kata.cd.address, kata.cd.dir / "pod-logs") as kubelet:
        for i in range(plan.cri):
            for name, handler in list(handlers.items()):
                start = time.monotonic()
                try:
                    pod = kubelet.run_pod(f"bench-{name}-{i}", handler)
                except grpc.RpcError as e:
                    if name == "kata":
                        raise
                    notes.append(f"CRI pod start: no {name} figure, its pod failed: "
                                 f"{e.details()}")  # type: ignore[attr-defined]
                    del handlers[name]
                    continue
                try:
                    kubelet.start_container(pod, "idle", IMAGE_REF, ["sleep", "3600"])
                    fig[name]["pod running s"].append(time.monotonic() - start)
                finally:
                    stop = time.monotonic()
                    kubelet.stop_pod(pod.id)
                    kubelet.remove_pod(pod.id)
                    fig[name]["stop + remove s"].append(time.monotonic() - stop)


def agent_rss_mib(kata: Kata, sandbox_id: str) -> float:
    """The agent's resident set in the guest, from the pod's metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch(find_socket(kata.state_dir, sandbox_id)).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kata_guest_agent_rss_bytes":
                return sample.value / (1 << 20)
    raise RuntimeError(f"{sandbox_id}: no kata_guest_agent_rss_bytes in its metrics")


def start_at_once(kata: Kata, name: str, ids: list[str]) -> tuple[float, list[float]]:
    """Wall time of `ctr run -d` for every id at once, and each one's own time."""
    def one(cid: str) -> float:
        return timed_ctr(kata.cd, *run_argv(kata, name, "-d"), cid, "sleep", "3600")[0]

    start = time.monotonic()
    with ThreadPoolExecutor(len(ids)) as pool:
        each = list(pool.map(one, ids))
    return time.monotonic() - start, each


def remove_all(kata: Kata, ids: list[str]) -> None:
    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(lambda cid: remove(kata.cd, cid), ids))


def pods_at_once(kata: Kata, name: str, count: int, plan: Plan, round_: int,
                 figs: Figures) -> float:
    """(4)(5) `count` idle containers started at once: times, then host memory per pod.
    Returns the wall time."""
    ids = [f"mem-{name}-{count}-{round_}-{i}" for i in range(count)]
    before = mem_available_mib()
    wall, each = start_at_once(kata, name, ids)
    try:
        time.sleep(plan.settle)  # let boot-time work (and page cache churn) settle
        fig = figs[f"memory, {'1 pod' if count == 1 else f'{count} pods'}"][name]
        pids = role_pids(kata.cd)
        fig["MemAvailable drop per pod MiB"].append((before - mem_available_mib()) / count)
        fig["PSS per pod MiB"].append(pss_mib(p for g in pids.values() for p in g) / count)
        for role, group in pids.items():
            if group:
                fig[f"{role} PSS per pod MiB"].append(pss_mib(group) / count)
        if name == "kata":
            rss = [agent_rss_mib(kata, cid) for cid in ids]
            fig["agent RSS (guest) MiB"].append(statistics.mean(rss))
        starts = figs["pods at once" if count > 1 else "pod alone"][name]
        starts["start s (each)"].extend(each)
        starts["wall s"].append(wall)
    finally:
        remove_all(kata, ids)
    return wall


def pod_memory_and_parallel(kata: Kata, plan: Plan, figs: Figures) -> None:
    for name in RUNTIMES:
        alone = [pods_at_once(kata, name, 1, plan, i, figs) for i in range(plan.singles)]
        wall = pods_at_once(kata, name, plan.parallel, plan, 0, figs)
        # How much faster than one after the other: serial time / parallel wall time.
        speedup = plan.parallel * statistics.median(alone) / wall
        figs["pods at once"][name]["speed-up over serial x"].append(speedup)


def shim_cost(kata: Kata, plan: Plan, figs: Figures) -> None:
    """(6) shim CPU per `ctr run --rm true` lifecycle, and its PSS with one idle pod."""
    fig = figs["shim"]
    for i in range(plan.lifecycles):
        for name in RUNTIMES:
            with ShimCpu(kata.cd) as cpu:
                timed_ctr(kata.cd, *run_argv(kata, name, "--rm"), f"cpu-{name}-{i}", "true")
            fig[name]["CPU s per lifecycle"].append(cpu.seconds)
    for name in RUNTIMES:
        fig[name]["PSS MiB"] = list(figs["memory, 1 pod"][name].get("shim PSS per pod MiB", []))


def stdout_sizes(plan: Plan, name: str) -> tuple[int, int]:
    """Bytes printed through a pipe and through a tty. Both runtimes pipe
    `RUNC_STDOUT_SCALE` x `stdout_bytes`: generating less takes our guest only a few ms once
    its binaries are cached, under the noise of the exec it is measured against. Ours
    prints `stdout_bytes` through its tty, which is slow under TCG."""
    scaled = plan.stdout_bytes * RUNC_STDOUT_SCALE
    return scaled, scaled if name == "runc" else plan.stdout_bytes


def exec_and_stdout(kata: Kata, plan: Plan, figs: Figures) -> None:
    """(7) `ctr task exec ... true`; (8) stdout through a pipe and a tty against /dev/null."""
    for name in RUNTIMES:
        cid = f"exec-{name}"
        timed_ctr(kata.cd, *run_argv(kata, name, "-d"), cid, "sleep", "3600")
        try:
            ex = figs["exec"][name]
            for i in range(plan.execs):
                ex["exec true s"].append(timed_ctr(kata.cd, "task", "exec", "--exec-id",
                                                   f"t{i}", cid, "true")[0])
            base = statistics.median(ex["exec true s"])
            for i in range(max(1, plan.execs // 3)):
                stdout_round(kata, cid, str(i), stdout_sizes(plan, name), base,
                             figs["stdout"][name])
        finally:
            remove(kata.cd, cid)


def stdout_round(kata: Kata, cid: str, tag: str, sizes: tuple[int, int], base: float,
                 out: dict[str, list[float]]) -> None:
    """One sample of each stdout metric, net of `base` (an `exec true`): to /dev/null and
    through a pipe at the pipe's size, through a tty at the tty's. The tty is compared with
    generating its bytes at the rate /dev/null showed for the pipe's size (a few ms at the
    tty's own size would be lost in the exec's noise)."""
    def make(size: int) -> str:
        return f"yes 0123456789abcdef | head -c {size}"

    pipe_size, tty_size = sizes
    null, _ = timed_ctr(kata.cd, "task", "exec", "--exec-id", f"n{tag}", cid, "sh", "-c",
                        f"{make(pipe_size)} >/dev/null")
    pipe, res = timed_ctr(kata.cd, "task", "exec", "--exec-id", f"p{tag}", cid,
                          "sh", "-c", make(pipe_size))
    if len(res.stdout) != pipe_size:
        raise RuntimeError(f"{cid}: {len(res.stdout)} bytes through the pipe, not {pipe_size}")
    tty, printed = timed_tty_exec(kata.cd, cid, f"y{tag}", make(tty_size))
    if printed < tty_size:  # the tty turns \n into \r\n: more, never less
        raise RuntimeError(f"{cid}: {printed} bytes through the tty, not {tty_size}")
    net_null = max(null - base, 1e-3)
    pipe_mib, tty_mib = pipe_size / (1 << 20), tty_size / (1 << 20)
    out["pipe MiB"].append(pipe_mib)
    out["tty MiB"].append(tty_mib)
    out["to /dev/null s"].append(null)
    out["pipe s"].append(pipe)
    out["tty s"].append(tty)
    out["pipe MiB/s"].append(pipe_mib / max(pipe - base, 1e-3))
    out["tty MiB/s"].append(tty_mib / max(tty - base, 1e-3))
    out["pipe / devnull x"].append((pipe - base) / net_null)
    out["tty / devnull x"].append((tty - base) / (net_null * tty_size / pipe_size))


STEPS = (cold_runs, boot_floor, vm_template, pod_memory_and_parallel, shim_cost,
         exec_and_stdout)


def measure(plan: Plan) -> tuple[Figures, str, list[str]]:
    """Every figure, the accelerator our VMs ran under, and notes on what is missing."""
    figs: Figures = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    notes: list[str] = []
    steps = [*STEPS[:2], functools.partial(vm_template, notes=notes),
             functools.partial(cri_pod_starts, notes=notes), *STEPS[3:]]
    with kata_cri_containerd() as kata:
        kata.write_config({"hypervisor.qemu": {"default_memory": GUEST_MEMORY_MIB}})
        for step in steps:
            print(f"bench: {getattr(step, 'func', step).__name__} ...",
                  file=sys.stderr, flush=True)
            step(kata, plan, figs)
        m = ACCEL.search(kata.cd.log_path.read_text(errors="replace"))
    return figs, m[1] if m else "unknown", notes


def plain(figs: Figures) -> dict[str, Any]:
    return {f: {r: dict(metrics) for r, metrics in runtimes.items()}
            for f, runtimes in figs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few samples of each figure")
    ap.add_argument("--out", type=Path, default=REPO / "build/out/bench")
    ap.add_argument("--doc", type=Path, help="rewrite the results table in this file")
    args = ap.parse_args(argv)
    started = results.machine_meta(REPO, "unknown", args.quick)  # the date it began
    figs, accel, notes = measure(QUICK if args.quick else Plan())
    meta = {**started, "accelerator": accel, "notes": notes}
    run = {"meta": meta, "figures": plain(figs)}
    stem = args.out / f"bench-{run['meta']['date'].replace(':', '')[:17]}"
    results.write_json(run, stem.with_suffix(".json"))
    text = results.table(run)
    stem.with_suffix(".md").write_text(text)
    results.chart(run, stem.with_suffix(".png"), CHART)
    if args.doc:
        results.update_doc(args.doc, text)
    print(text)
    print(f"bench: results in {stem}.json, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
