"""The agent channel, side by side: virtio-serial against vsock through our vhost-user
back-end (issue 12), in one run, rounds interleaved so host noise falls on both.

    sudo .venv/bin/python -m benchmarks.agent_channel [-n 3] [--calls 200] [--mib 16]

Two layers, each per channel:

* **the agent channel itself**: a VM started by the QEMU driver as the sandbox layer starts
  one (512 MiB, the share cold-plugged), the host's `AgentClient` connected to it: seconds
  from the VMM's spawn until the agent answers (boot + channel set-up), then ``--calls``
  sequential ``Check`` calls (one ttrpc round trip each: median and 95th percentile, µs);
* **what a user sees**, through a private containerd and ``ctr``: ``exec true`` (an exec's
  several agent calls), ``--mib`` MiB of a container's stdout through a pipe, and the same
  into its stdin (``wc -c``), MiB/s net of the ``exec true`` time.

Each figure is the median over ``-n`` rounds. Not part of `make test` (a smoke run is:
tests/e2e/test_bench_agent_channel.py); the figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent_client.client import AgentClient
from benchmarks.measure import timed_ctr
from hypervisors.base import SharedFsDevice, VmSpec
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.vm import Qemu
from tests.harness.kata import Kata, kata_containerd
from tests.harness.kataconfig import GUEST_DIR
from tests.harness.scenarios import KATA, remove

#: Channel name -> the QEMU keys that select it.
CHANNELS: dict[str, dict[str, Any]] = {
    "serial": {"use_vsock": False},
    "vsock (vhost-user)": {"use_vsock": True, "vsock_backend": "vhost-user"},
}
MEMORY_MIB = 512
BOOT_TIMEOUT = 180.0
#: Seconds between the agent's first answer and the timed calls.
SETTLE = 3.0

Samples = dict[str, dict[str, list[float]]]


# -- the channel, from the host's agent client -------------------------------------------

def qemu_config(keys: dict[str, Any]) -> QemuConfig:
    return QemuConfig(kernel=str(GUEST_DIR / "vmlinux"), initrd=str(GUEST_DIR / "initrd.img"),
                      default_memory=MEMORY_MIB, allow_tcg=True, **keys)


async def channel_round(keys: dict[str, Any], calls: int, work: Path,
                        settle: float = SETTLE) -> dict[str, list[float]]:
    """One VM: seconds to a connected agent, then ``calls`` Check round trips (µs)."""
    sandbox = f"bench-{uuid.uuid4().hex[:8]}"
    share = work / sandbox / "shared"
    share.mkdir(parents=True)
    vm = Qemu(qemu_config(keys), VmSpec(sandbox, work / sandbox / "state"))
    await vm.add_device(SharedFsDevice(share, "virtio-fs", "kataShared"))
    started = time.monotonic()
    await vm.start()
    try:
        agent = await AgentClient.connect(vm.agent_address, BOOT_TIMEOUT)
        ready = time.monotonic() - started
        try:
            await asyncio.sleep(settle)  # the guest finishes its boot-time work first
            trips = []
            for _ in range(calls):
                t0 = time.perf_counter()
                await agent.health_check(10)
                trips.append((time.perf_counter() - t0) * 1e6)
        finally:
            await agent.close()
    finally:
        await vm.stop()
    trips.sort()
    return {"agent ready s": [ready], "Check median us": [statistics.median(trips)],
            "Check p95 us": [trips[int(len(trips) * 0.95) - 1]]}


# -- what a user sees, through containerd --------------------------------------------------

def user_round(kata: Kata, keys: dict[str, Any], mib: int, tag: str) -> dict[str, list[float]]:
    """One pod: exec latency, stdout and stdin throughput."""
    kata.write_config({"hypervisor.qemu": keys})
    cid = f"chan-{tag}"
    timed_ctr(kata.cd, "run", "-d", "--runtime", KATA, "docker.io/library/busybox:latest",
              cid, "sleep", "3600")
    size = mib << 20
    try:
        execs = [timed_ctr(kata.cd, "task", "exec", "--exec-id", f"t{i}", cid, "true")[0]
                 for i in range(5)]
        base = statistics.median(execs)
        took, res = timed_ctr(kata.cd, "task", "exec", "--exec-id", "out", cid, "sh", "-c",
                              f"yes 0123456789abcdef | head -c {size}")
        if len(res.stdout) != size:
            raise RuntimeError(f"{len(res.stdout)} bytes of stdout, not {size}")
        start = time.monotonic()
        res = kata.cd.ctr("task", "exec", "--exec-id", "in", cid, "wc", "-c",
                          input="x" * size, timeout=BOOT_TIMEOUT)
        into = time.monotonic() - start
        if res.returncode != 0 or int(res.stdout.split()[0]) != size:
            raise RuntimeError(f"stdin: {res.stdout!r} {res.stderr!r}")
    finally:
        remove(kata.cd, cid)
    return {"exec true s": [base], "stdout MiB/s": [mib / max(took - base, 1e-3)],
            "stdin MiB/s": [mib / max(into - base, 1e-3)]}


# -- the run ------------------------------------------------------------------------------

def merge(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    for key, values in more.items():
        into.setdefault(key, []).extend(values)


def run(rounds: int, calls: int, mib: int, channels: Sequence[str] = tuple(CHANNELS),
        settle: float = SETTLE) -> Samples:
    """Every figure for every channel, rounds interleaved."""
    samples: Samples = defaultdict(dict)
    with tempfile.TemporaryDirectory(prefix="bch-") as tmp:
        for r in range(rounds):
            for name in channels:
                print(f"agent channel: round {r + 1}, {name}", file=sys.stderr, flush=True)
                merge(samples[name], asyncio.run(channel_round(CHANNELS[name], calls,
                                                               Path(tmp), settle)))
    with kata_containerd() as kata:
        for r in range(rounds):
            for i, name in enumerate(channels):
                merge(samples[name], user_round(kata, CHANNELS[name], mib, f"{r}-{i}"))
    return samples


def table(samples: Samples) -> str:
    names = list(samples)
    keys = list(next(iter(samples.values())))
    lines = ["| figure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = [f"{statistics.median(samples[n][key]):.3g}" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3, help="rounds (each figure is their median)")
    ap.add_argument("--calls", type=int, default=200, help="Check calls per VM")
    ap.add_argument("--mib", type=int, default=16, help="MiB through stdout and stdin")
    args = ap.parse_args(argv)
    samples = run(args.n, args.calls, args.mib)
    print(table(samples))
    print({n: {k: [round(v, 4) for v in vs] for k, vs in s.items()}
           for n, s in samples.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
