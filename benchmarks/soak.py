"""Soak: many container and pod cycles; resources before and after must be a flat line.

    sudo .venv/bin/python -m benchmarks.soak [--containers 200] [--pods 50]

In one private containerd:

1. a long-lived pod (sandbox container ``soak-pod``, ``sleep``) serves ``--containers``
   cycles of ``ctr run --rm`` of a container in that pod (same shim, same VM), each
   followed by an exec probe (``ctr task exec ... true``) in the sandbox container, as a
   kubelet's probe would;
2. then ``--pods`` cycles of a whole pod (``ctr run --rm``: a VM each), each with a probe.

Recorded before, during and after: the pod's shim (open fds, RSS), containerd (open fds,
RSS), mounts and sandbox state dirs, and processes of ours. A leak shows as growth; the
script exits 1 when an fd count grew by more than ``--fd-slack`` or a count of mounts,
state dirs or processes did not come back. ``make soak`` runs the full numbers; ``make test``
runs a few cycles of each (tests/e2e/test_soak.py) to keep the script working.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

from tests.harness import procs
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata, kata_containerd
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, explain, remove, run_detached

SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
POD = "soak-pod"


@dataclass(frozen=True)
class Sample:
    """What one measurement saw."""

    shim_fds: int
    shim_rss_kib: int
    containerd_fds: int
    containerd_rss_kib: int
    mounts: int
    sandboxes: int
    vmms: int
    shims: int

    def row(self, label: str) -> str:
        shim = f"{self.shim_fds} | {self.shim_rss_kib / 1024:.1f}" if self.shims else "- | -"
        return (f"| {label} | {shim} | {self.containerd_fds} | "
                f"{self.containerd_rss_kib / 1024:.1f} | {self.mounts} | {self.sandboxes} | "
                f"{self.vmms} | {self.shims} |")


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def sample(kata: Kata) -> Sample:
    shims = kata.shim_daemons()
    shim = shims[0].pid if shims else 0
    cd = kata.cd.proc.pid if kata.cd.proc is not None else 0
    ours = 0
    # The host's mount table, and the shim's own namespace, where container mounts live.
    for table in ("/proc/self/mountinfo", f"/proc/{shim}/mountinfo" if shim else ""):
        try:
            with open(table) as f:
                ours += sum(1 for line in f if str(kata.state_dir) in line)
        except OSError:
            continue
    return Sample(fds(shim), rss_kib(shim), fds(cd), rss_kib(cd), ours,
                  len(kata.sandbox_dirs()), len(kata.qemu_processes()), len(shims))


def probe(kata: Kata, cid: str, n: int) -> None:
    res = kata.cd.ctr("task", "exec", "--exec-id", f"probe-{n}", cid, "true",
                      timeout=BOOT_TIMEOUT)  # fmt: skip
    assert res.returncode == 0, explain(res)


def container_cycles(kata: Kata, n: int, report: list[str]) -> tuple[Sample, Sample]:
    run_detached(kata.cd, KATA, POD, "sleep", "100000")
    probe(kata, POD, 0)
    first = sample(kata)
    report.append(first.row("pod up, 0 cycles"))
    started = time.monotonic()
    for i in range(1, n + 1):
        res = kata.cd.ctr("run", "--rm", "--runtime", KATA, "--annotation",
                          f"{SANDBOX_ID}={POD}", IMAGE_REF, f"soak-c{i}", "true",
                          timeout=BOOT_TIMEOUT)  # fmt: skip
        assert res.returncode == 0, explain(res)
        probe(kata, POD, i)
        if i % max(1, n // 4) == 0 or i == n:
            report.append(sample(kata).row(f"{i} container cycles"))
    last = sample(kata)
    report.append(f"\n{n} container cycles in {time.monotonic() - started:.0f} s\n")
    remove(kata.cd, POD)
    return first, last


def pod_cycles(kata: Kata, n: int, report: list[str]) -> tuple[Sample, Sample]:
    procs.wait_until(lambda: sample(kata).shims == 0, 30)  # the last pod's shim exits
    first = sample(kata)
    report.append(first.row("0 pod cycles"))
    started = time.monotonic()
    for i in range(1, n + 1):
        run_detached(kata.cd, KATA, f"soak-p{i}", "sleep", "300")
        probe(kata, f"soak-p{i}", i)
        remove(kata.cd, f"soak-p{i}")
        if i % max(1, n // 4) == 0 or i == n:
            report.append(sample(kata).row(f"{i} pod cycles"))
    procs.wait_until(lambda: sample(kata).vmms == sample(kata).shims == 0, 30)
    last = sample(kata)
    report.append(last.row(f"{n} pod cycles, settled"))
    report.append(f"\n{n} pod cycles in {time.monotonic() - started:.0f} s")
    return first, last


def flat(before: Sample, after: Sample, fd_slack: int, what: str) -> list[str]:
    """The growths that count as leaks."""
    problems = []
    if after.shim_fds > before.shim_fds + fd_slack:
        problems.append(f"{what}: shim fds {before.shim_fds} -> {after.shim_fds}")
    if after.containerd_fds > before.containerd_fds + fd_slack:
        problems.append(f"{what}: containerd fds {before.containerd_fds} -> "
                        f"{after.containerd_fds}")
    for field in ("mounts", "sandboxes", "vmms", "shims"):
        if getattr(after, field) > getattr(before, field):
            problems.append(f"{what}: {field} {getattr(before, field)} -> "
                            f"{getattr(after, field)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--containers", type=int, default=200)
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--fd-slack", type=int, default=4,
                    help="fd growth tolerated (lazily opened files such as logs)")
    args = ap.parse_args(argv)
    header = ("| moment | shim fds | shim RSS MiB | containerd fds | containerd RSS MiB | "
              "our mounts | sandbox dirs | VMMs | shims |\n|---|---|---|---|---|---|---|---|---|")
    report = [header]
    with kata_containerd() as kata:
        c_first, c_last = container_cycles(kata, args.containers, report)
        report.append(header)
        p_first, p_last = pod_cycles(kata, args.pods, report)
    problems = flat(c_first, c_last, args.fd_slack, "container cycles")
    problems += flat(p_first, p_last, args.fd_slack, "pod cycles")
    print("\n".join(report))
    print("\n" + ("\n".join(problems) if problems else "flat: no growth beyond the slack"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
