"""`kata-runtime metrics` and the shim's metrics endpoint against the real stack.

A pod runs a busy loop under `ctr`; `kata-runtime metrics <id>` prints Prometheus text that
prometheus_client's own parser reads, with the shim's, QEMU's and virtiofsd's figures, the
guest's memory (within the VM's configured size) and load, the container's CPU and memory
from its guest cgroup, and the agent's round trip. The socket is root-only. Once the pod is
deleted the socket is gone and `metrics` fails with a clear message; a shim killed with
SIGKILL leaves a sandbox whose `metrics` fails clearly too. The fixture's leak check runs.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sandbox.state import monitor_socket_path
from tests.harness import procs
from tests.harness.containerd import RUNTIME_BIN, wait_task_status
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, detached, explain, remove, run_detached

KATA_RUNTIME = RUNTIME_BIN / "kata-runtime"
VM_MEMORY = 512 << 20  # kataconfig.overrides_for_tests' default_memory
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def metrics(config: Path, sandbox_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KATA_RUNTIME), "--config", str(config), "metrics", sandbox_id],
                          capture_output=True, text=True, timeout=60, check=False)


def scrape(kata: Kata, sandbox_id: str) -> tuple[Samples, dict[str, str]]:
    """{sample: {labels: value}} and {family: type}, read by prometheus_client's parser."""
    res = metrics(kata.config_path, sandbox_id)
    assert res.returncode == 0 and res.stderr == "", explain(res)
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(res.stdout):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    found = samples.get(name, {})
    key = frozenset(labels.items())
    assert key in found, f"{name}{labels} not in {sorted(found, key=str)}"
    return found[key]


def test_metrics_while_a_pod_runs_and_none_after_it(kata: Kata) -> None:
    cid = "ktest-metrics"
    sb = {"sandbox_id": cid}
    box = {"container_id": cid, **sb}
    with detached(kata.cd, KATA, cid, "sh", "-c", "while :; do :; done"):
        sock = monitor_socket_path(kata.state_dir, kata.cd.namespace, cid)
        assert sock.is_socket() and stat.S_IMODE(sock.stat().st_mode) == 0o600, sock
        # The daemon starts without OpenSSL (shim/tls.py); the first scrape brings it.
        daemons = kata.shim_daemons()
        assert daemons, kata.cd.shim_processes()
        for daemon in daemons:
            maps = Path(f"/proc/{daemon.pid}/maps").read_text()
            assert "libssl" not in maps and "libcrypto" not in maps, daemon
        first, types = scrape(kata, cid)
        time.sleep(2)
        samples, _ = scrape(kata, cid)

        assert value(samples, "kata_shim_rss_bytes", **sb) > 1 << 20
        assert value(samples, "kata_shim_open_fds", **sb) > 3
        assert value(samples, "kata_shim_threads", **sb) >= 1
        assert value(samples, "kata_shim_tasks", **sb) >= 1
        assert value(samples, "kata_shim_cpu_seconds_total", **sb) > 0
        assert types["kata_shim_cpu_seconds"] == "counter"
        for vmm in ("kata_hypervisor", "kata_virtiofsd"):
            rss = value(samples, f"{vmm}_rss_bytes", **sb)
            assert rss > 1 << 20, vmm
            # PSS splits pages shared with other processes (another pod's virtiofsd maps
            # the same libraries): only the guest's RAM makes QEMU's large for sure.
            assert 0 < value(samples, f"{vmm}_pss_bytes", **sb) <= rss, vmm
            assert value(samples, f"{vmm}_threads", **sb) >= 1, vmm
            assert value(samples, f"{vmm}_open_fds", **sb) >= 3, vmm
        assert value(samples, "kata_hypervisor_pss_bytes", **sb) > 32 << 20
        # The guest spins: QEMU's CPU time grows between the scrapes.
        assert value(samples, "kata_hypervisor_cpu_seconds_total", **sb) > \
            value(first, "kata_hypervisor_cpu_seconds_total", **sb)

        total = value(samples, "kata_guest_memory_total_bytes", **sb)
        assert VM_MEMORY // 2 < total <= VM_MEMORY, total
        assert 0 < value(samples, "kata_guest_memory_available_bytes", **sb) <= total
        assert 0 < value(samples, "kata_guest_memory_free_bytes", **sb) <= total
        # The busy loop: the guest's load (recomputed every 5 s) is above 0 soon.
        assert procs.wait_until(
            lambda: value(scrape(kata, cid)[0], "kata_guest_load1", **sb) > 0, 30)
        assert value(samples, "kata_guest_uptime_seconds", **sb) > 0
        assert 1 << 20 < value(samples, "kata_guest_agent_rss_bytes", **sb) < total

        cpu = value(samples, "kata_container_cpu_seconds_total", **box)
        assert cpu > value(first, "kata_container_cpu_seconds_total", **box) > 0
        assert 0 < value(samples, "kata_container_memory_usage_bytes", **box) < total
        assert value(samples, "kata_container_pids", **box) >= 1

        assert value(samples, "kata_agent_up", **sb) == 1
        rtt = value(samples, "kata_agent_rpc_duration_seconds", method="GetGuestStats",
                    outcome="ok", **sb)
        assert 0 < rtt < 5, rtt
        assert value(samples, "kata_agent_rpc_duration_seconds", method="StatsContainer",
                     outcome="ok", **sb) > 0

    assert procs.wait_until(lambda: not sock.exists() and not sock.parent.exists(), 30), sock
    res = metrics(kata.config_path, cid)
    assert (res.returncode, res.stdout) == (1, ""), explain(res)
    assert res.stderr.startswith(f"kata-runtime metrics: no sandbox {cid} under "), res.stderr


def test_metrics_of_a_sandbox_whose_shim_was_killed_fail_clearly(kata: Kata) -> None:
    cid = "ktest-metrics-kill"
    run_detached(kata.cd, KATA, cid, "sleep", "300")
    try:
        scrape(kata, cid)  # served while the shim lives
        (shim,) = kata.shim_daemons()
        assert kata.cd.proc is not None
        os.kill(kata.cd.proc.pid, signal.SIGSTOP)  # or containerd cleans up at once
        try:
            os.kill(shim.pid, signal.SIGKILL)
            assert procs.wait_until(lambda: procs.is_zombie(shim.pid), 10), "the shim lives"
            res = metrics(kata.config_path, cid)
        finally:
            os.kill(kata.cd.proc.pid, signal.SIGCONT)
        assert (res.returncode, res.stdout) == (1, ""), explain(res)
        assert f"kata-runtime metrics: sandbox {cid}: its shim serves no metrics at " \
            in res.stderr and "refused" in res.stderr.lower(), res.stderr
        status = wait_task_status(kata.cd, cid, ["STOPPED", ""], timeout=60)
        assert status in ("STOPPED", ""), status
    finally:
        if cid in kata.cd.containers():
            remove(kata.cd, cid)
