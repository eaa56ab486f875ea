"""The VM cache (`[factory] vm_cache_number`): `kata-runtime factory init` keeps VMs booted,
pods take one (their share hot-plugged, clock set, RNG reseeded), a replacement boots, a
pod the cache's VMs do not fit (or with no cache running) boots as before, a shim killed
with -9 takes its VM with it, a pod outlives the cache (even killed with -9), and
`factory destroy` stops the cache and leaves nothing.

QEMU on q35 only (a cached VM's devices go into PCIe root ports, as a template's).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import kataconfig, procs
from tests.harness.containerd import RUNTIME_BIN, cni_gateway
from tests.harness.cri.client import Kubelet, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, Kata
from tests.harness.scenarios import KATA, explain, remove, run_detached, run_rm

pytestmark = pytest.mark.skipif(not kataconfig.can_hotplug(),
                                reason="the VM cache needs QEMU on q35 (PCIe root ports)")

KATA_RUNTIME = RUNTIME_BIN / "kata-runtime"
TAKEN = "taken from the VM cache"
#: A cached VM's boot under TCG, with pods booting beside it.
READY_TIMEOUT = 300.0


def enable(kata: Kata, count: int, **hypervisor: object) -> None:
    """The cache on; the agent on virtio-serial (as for templates), also in `make test-vsock`."""
    kata.write_config({"factory": {"vm_cache_number": count}},
                      {kataconfig.HYPERVISOR: {"use_vsock": False, **hypervisor}})


def factory(kata: Kata, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KATA_RUNTIME), "--config", str(kata.config_path), "factory",
                           action], capture_output=True, text=True, timeout=60, check=False)


def shim_log(kata: Kata) -> str:
    return kata.cd.log_path.read_text(errors="replace")


@contextlib.contextmanager
def cache_daemon(kata: Kata, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`kata-runtime factory init` in the background until its first VM is ready; stopped
    by `factory destroy` (and killed if it does not exit)."""
    with log.open("wb") as out:
        daemon = subprocess.Popen([str(KATA_RUNTIME), "--config", str(kata.config_path),
                                   "factory", "init"], stdout=out, stderr=subprocess.STDOUT)
    try:
        assert procs.wait_until(lambda: ready_count(log) >= 1 or daemon.poll() is not None,
                                READY_TIMEOUT, interval=0.5), log.read_text()[-3000:]
        assert daemon.poll() is None, log.read_text()[-3000:]
        yield daemon
    finally:
        with contextlib.suppress(Exception):
            factory(kata, "destroy")
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def ready_count(log: Path) -> int:
    return log.read_text(errors="replace").count(" ready (")


def test_pods_take_booted_vms_from_the_cache(kata: Kata, tmp_path: Path) -> None:
    enable(kata, 1)
    # No cache running: the pod boots, and the shim says why.
    res = run_rm(kata.cd, KATA, "nocache", "true")
    assert res.returncode == 0, explain(res)
    assert "no VM from the VM cache" in shim_log(kata) and TAKEN not in shim_log(kata)

    log = tmp_path / "cache.log"
    with cache_daemon(kata, log) as daemon:
        status = factory(kata, "status")
        assert "1 of 1 VMs ready, 0 in pods" in status.stdout, explain(status)
        check = subprocess.run([str(KATA_RUNTIME), "--config", str(kata.config_path), "check"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert "VM cache: " in check.stdout and "1 of 1 VMs ready" in check.stdout, \
            explain(check)
        script = "date +%s; cat /proc/sys/kernel/random/uuid; ls /bin/busybox; nproc"
        before = time.time()
        res = run_rm(kata.cd, KATA, "cached1", "sh", "-c", script)
        after = time.time()
        assert res.returncode == 0, explain(res)
        guest_now, _uuid, busybox, _nproc = res.stdout.split()
        assert before - 2 <= int(guest_now) <= after + 2, (before, guest_now, after)
        assert busybox == "/bin/busybox"  # the rootfs share, hot-plugged into the cached VM
        assert shim_log(kata).count(TAKEN) == 1, shim_log(kata)[-3000:]
        assert "guest clock set, RNG reseeded" in shim_log(kata)

        # A replacement boots; the next pod's QEMU runs under a holder the cache spawned,
        # and a shim killed with -9 takes it along (the holder's owner socket closes).
        assert procs.wait_until(lambda: ready_count(log) >= 2, READY_TIMEOUT, 0.5), \
            log.read_text()[-3000:]
        run_detached(kata.cd, KATA, "cached2", "sleep", "300")
        assert shim_log(kata).count(TAKEN) == 2, shim_log(kata)[-3000:]
        taken = int(re.findall(rf"{TAKEN} \(\S+, pid (\d+)\)", shim_log(kata))[-1])
        holder = procs.parent_of(taken)
        assert holder is not None and procs.parent_of(holder) == daemon.pid
        assert procs.argv_of(holder)[0].endswith("/kata-vm-holder")
        (sandbox,) = kata.sandbox_dirs()
        assert (sandbox / "console.log").exists(), list(sandbox.iterdir())
        (shim,) = kata.shim_daemons()
        os.kill(shim.pid, signal.SIGKILL)
        assert procs.wait_until(lambda: not procs.alive(taken), 30), log.read_text()[-3000:]
        assert procs.wait_until(lambda: kata.cd.tasks().get("cached2") != "RUNNING", 30)
        kata.cd.ctr("task", "delete", "cached2")
        res = kata.cd.ctr("container", "delete", "cached2")
        assert res.returncode == 0, explain(res)

        # A pod the cache's VMs do not fit boots, and the shim says why.
        hypervisor = tomllib.loads(kata.config_path.read_text())["hypervisor"]
        params = next(iter(hypervisor.values())).get("kernel_params", "") + " loglevel=1"
        enable(kata, 1, kernel_params=params)
        res = run_rm(kata.cd, KATA, "nofit", "cat", "/proc/cmdline")
        assert res.returncode == 0 and "loglevel=1" in res.stdout, explain(res)
        assert "the VM cache's VMs do not fit it" in shim_log(kata), shim_log(kata)[-3000:]
        assert shim_log(kata).count(TAKEN) == 2

        stop = factory(kata, "destroy")
        assert stop.returncode == 0 and "VM cache asked to stop" in stop.stdout, explain(stop)
        assert daemon.wait(60) == 0, log.read_text()[-3000:]
    assert not (kata.state_dir / "vm-cache.sock").exists()
    assert not (kata.state_dir / "vm-cache.sock.d").exists()
    assert not kata.qemu_processes()


def test_pods_outlive_a_stopped_or_killed_cache_and_the_next_cache_cleans_up(
        kata: Kata, tmp_path: Path) -> None:
    """The VMs a cache boots live under holders owned through sockets: stopped (`factory
    destroy`) or killed with -9, the cache takes the VMs no pod took along, the pods that
    took one run on and end as usual, and `factory destroy` removes what a killed one left."""
    enable(kata, 1)
    left = kata.state_dir / "vm-cache.sock.d"
    with cache_daemon(kata, tmp_path / "cache.log") as daemon:
        run_detached(kata.cd, KATA, "calm", "sleep", "300")
        stop = factory(kata, "destroy")
        assert stop.returncode == 0 and "VM cache asked to stop" in stop.stdout, explain(stop)
        assert daemon.wait(60) == 0
    assert not left.exists()
    log = tmp_path / "cache2.log"
    with cache_daemon(kata, log) as daemon:
        run_detached(kata.cd, KATA, "survivor", "sleep", "300")
        assert shim_log(kata).count(TAKEN) == 2, shim_log(kata)[-3000:]
        assert procs.wait_until(lambda: ready_count(log) >= 2, READY_TIMEOUT, 0.5)
        assert len(kata.qemu_processes()) == 6  # three QEMUs, each under its holder
        daemon.kill()
        daemon.wait()
        # The idle VM goes with the cache; the pods' stay.
        assert procs.wait_until(lambda: len(kata.qemu_processes()) == 4, 30), \
            kata.qemu_processes()
        for cid in ("calm", "survivor"):
            res = kata.cd.ctr("task", "exec", "--exec-id", "e1", cid, "echo", "alive")
            assert res.returncode == 0 and res.stdout.strip() == "alive", explain(res)
        assert any(p.name.startswith("vm-") for p in left.iterdir()), list(left.iterdir())
        # With no cache serving, `factory destroy` removes what the killed one left; the
        # pods that took its VMs run on.
        destroy = factory(kata, "destroy")
        assert destroy.returncode == 0 and "what a killed VM cache left was removed" \
            in destroy.stdout, explain(destroy)
        assert not left.exists() and not (kata.state_dir / "vm-cache.sock").exists()
        res = kata.cd.ctr("task", "exec", "--exec-id", "e2", "survivor", "echo", "alive")
        assert res.returncode == 0 and res.stdout.strip() == "alive", explain(res)
    remove(kata.cd, "calm")
    remove(kata.cd, "survivor")
    assert procs.wait_until(lambda: not kata.qemu_processes(), 30), kata.qemu_processes()
    # The next cache starts afresh, then leaves nothing (a killed cache's leftovers found
    # at its start go too: tests/unit/test_qemu_vmcache.py).
    with cache_daemon(kata, tmp_path / "cache3.log"):
        assert [p.name for p in left.iterdir() if p.name.startswith("vm-")] == ["vm-1"]
    assert not left.exists() and not (kata.state_dir / "vm-cache.sock").exists()


def test_a_kubernetes_pod_with_limits_takes_a_cached_vm_with_its_cni_network(
        cri: tuple[Kata, Kubelet], tmp_path: Path) -> None:
    """Through CRI: RunPodSandbox on a VM from the cache, the pod's CNI veth hot-plugged as
    its NIC and its limits' memory hot-plugged into the smallest VM, then the container."""
    kata, kubelet = cri
    enable(kata, 1, memory_slots=2)
    with cache_daemon(kata, tmp_path / "cache.log"):
        pod = kubelet.run_pod("cachepod", CRI_HANDLER, PodOptions(memory_limit_bytes=256 << 20))
        ip = kubelet.pod_status(pod.id).network.ip
        app = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
        res = kubelet.exec_sync(app, ["sh", "-c", "ip -o -4 addr show eth0; grep MemTotal "
                                      "/proc/meminfo; ping -c 1 -W 5 "
                                      + cni_gateway(kata.cd.dir / "cni")
                                      + " >/dev/null && echo PING-OK"], timeout=90)
        out = res.stdout.decode()
        assert res.exit_code == 0 and f"inet {ip}/" in out and "PING-OK" in out, (res, out)
        mem_kib = int(out.split("MemTotal:")[1].split()[0])
        base = tomllib.loads(kata.config_path.read_text())["runtime"]["static_sandbox_base_memory"]
        # Grown by the limit from the base memory, which alone shows less than the base.
        assert base * 1024 < mem_kib <= (base + 256) * 1024, out
        assert TAKEN in shim_log(kata), shim_log(kata)[-3000:]
        kubelet.stop_pod(pod.id)
        kubelet.remove_pod(pod.id)
