"""What one idle Kubernetes pod costs the host beyond its containers: the figure behind the
RuntimeClass's ``overhead.podFixed``.

    sudo .venv/bin/python -m benchmarks.pod_overhead [-n 3] [--memory-mib 512]

Through containerd's CRI plugin (handler `kata`), runs a pod with a memory limit (its VM is
sized from it) and one idle container, then reads the Pss of the processes that serve the
pod on the host (shim, QEMU, virtiofsd, from /proc/<pid>/smaps_rollup) and their CPU time
over 10 idle seconds. The container itself uses almost nothing, so this is the pod's fixed
cost. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.measure import cpu_ticks, memory_kib, role_pids
from tests.harness.cri.client import ContainerOptions, Kubelet, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, Kata, kata_cri_containerd

IDLE_SECONDS = 10.0


def sample(kata: Kata, kubelet: Kubelet, memory_mib: int, n: int,
           settle: float = 5.0) -> dict[str, float]:
    limit = memory_mib << 20
    pod = kubelet.run_pod(f"overhead{n}", CRI_HANDLER, PodOptions(memory_limit_bytes=limit))
    try:
        kubelet.start_container(pod, "idle", IMAGE_REF, ["sleep", "3600"],
                                ContainerOptions(memory_limit_bytes=limit))
        time.sleep(settle)  # let the boot's transient work settle
        pids = role_pids(kata.cd)  # only kata pods run here: every shim is ours
        every = [p for group in pids.values() for p in group]
        before = sum(map(cpu_ticks, every))
        time.sleep(IDLE_SECONDS)
        used = (sum(map(cpu_ticks, every)) - before) / os.sysconf("SC_CLK_TCK")
        result = {f"{role}_pss_mib": sum(memory_kib(p)[1] for p in group) / 1024
                  for role, group in pids.items()}
        result["total_pss_mib"] = sum(result.values())
        result["idle_cpu_millicores"] = used / IDLE_SECONDS * 1000
        return result
    finally:
        kubelet.stop_pod(pod.id)
        kubelet.remove_pod(pod.id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3, help="pods, one after the other")
    parser.add_argument("--memory-mib", type=int, default=512, help="the pod's memory limit")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds between the container's start and the idle window "
                             "(past 60: the port mirror has slowed to its idle period)")
    args = parser.parse_args()
    with kata_cri_containerd() as kata:
        kubelet = Kubelet(kata.cd.address, kata.cd.dir / "pod-logs")
        samples = [sample(kata, kubelet, args.memory_mib, i, args.settle)
                   for i in range(args.n)]
        kubelet.close()
    print(f"pod with a {args.memory_mib} MiB limit, one idle container, {args.n} runs "
          f"(medians; accelerator as `kata-runtime check` reports):")
    for key in samples[0]:
        values = [s[key] for s in samples]
        print(f"  {key:22} {statistics.median(values):8.1f}   "
              f"(min {min(values):.1f}, max {max(values):.1f})")


if __name__ == "__main__":
    main()
