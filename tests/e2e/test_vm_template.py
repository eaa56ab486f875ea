"""VM templates (`[factory] enable_template`): `kata-runtime factory init` saves a booted VM,
pods are restored from it (their share, NIC, vCPUs and memory hot-plugged, their clock set
and RNG reseeded; through ctr and through CRI with a CNI network), `status` says whether it
fits, a pod it does not fit or whose state cannot load boots as before, and `destroy`
leaves nothing.

QEMU on q35 only: a template's devices go into PCIe root ports (microvm has none, StratoVirt
has no templates).
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.harness import kataconfig
from tests.harness.containerd import RUNTIME_BIN, cni_gateway
from tests.harness.cri.client import Kubelet, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, Kata
from tests.harness.scenarios import KATA, explain, remove, run_detached, run_rm, run_rm_args

pytestmark = pytest.mark.skipif(not kataconfig.can_hotplug(),
                                reason="templates need QEMU on q35 (PCIe root ports)")

KATA_RUNTIME = RUNTIME_BIN / "kata-runtime"
RESTORED = "restored from the VM template"
#: A template's boot under TCG (the pod's own start is then under a second).
INIT_TIMEOUT = 300.0


def factory(kata: Kata, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KATA_RUNTIME), "--config", str(kata.config_path), "factory",
                           action], capture_output=True, text=True, timeout=INIT_TIMEOUT,
                          check=False)


def enable(kata: Kata, template: Path, **hypervisor: object) -> None:
    """Templates on; the agent on virtio-serial, which templates need (docs/vsock.md), also
    in a run of the suite that puts it on vsock (``make test-vsock``)."""
    kata.write_config({"factory": {"enable_template": True, "template_path": str(template)}},
                      {kataconfig.HYPERVISOR: {"use_vsock": False, **hypervisor}})


def shim_log(kata: Kata) -> str:
    return kata.cd.log_path.read_text(errors="replace")


def test_pods_are_restored_from_the_template_and_made_their_own(kata: Kata,
                                                                tmp_path: Path) -> None:
    template = tmp_path / "tpl"
    enable(kata, template)
    try:
        made = factory(kata, "init")
        assert made.returncode == 0, explain(made)
        assert "VM template saved in" in made.stdout, made.stdout
        ram, state = (template / "ram").stat(), (template / "state").stat()
        assert state.st_mode & 0o077 == 0 and ram.st_mode & 0o077 == 0
        # The RAM stays out of the stream (x-ignore-shared), and its zero pages are holes.
        assert state.st_size < 4 << 20, state.st_size
        assert ram.st_blocks * 512 < ram.st_size * 3 // 4, (ram.st_blocks, ram.st_size)
        status = factory(kata, "status")
        assert status.returncode == 0 and "usable" in status.stdout, explain(status)

        script = "date +%s; cat /proc/sys/kernel/random/uuid; ls /bin/busybox"
        outputs = []
        for cid in ("tpl1", "tpl2"):
            before = time.time()
            res = run_rm(kata.cd, KATA, cid, "sh", "-c", script)
            after = time.time()
            assert res.returncode == 0, explain(res)
            guest_now, uuid, busybox = res.stdout.split()
            # The guest clock is the host's, not the template's (saved before `before`).
            assert before - 2 <= int(guest_now) <= after + 2, (before, guest_now, after)
            assert busybox == "/bin/busybox"  # the rootfs share, hot-plugged after restore
            outputs.append(uuid)
        assert shim_log(kata).count(RESTORED) == 2, shim_log(kata)[-3000:]
        assert "guest clock set, RNG reseeded" in shim_log(kata)
        run_detached(kata.cd, KATA, "tpl3", "sleep", "300")
        try:  # its RAM: the memfd the shim filled from the template's data pages
            (qemu,) = kata.qemu_processes()
            maps = Path(f"/proc/{qemu.pid}/maps").read_text()
            assert "/memfd:guest-ram" in maps, maps[-2000:]
        finally:
            remove(kata.cd, "tpl3")
        # Clones of one saved RNG state: without the reseed these could repeat.
        assert outputs[0] != outputs[1], outputs
    finally:
        gone = factory(kata, "destroy")
    assert gone.returncode == 0 and "removed" in gone.stdout, explain(gone)
    assert not template.exists()
    after_destroy = factory(kata, "status")
    assert after_destroy.returncode == 1, explain(after_destroy)
    assert "kata-runtime factory init" in after_destroy.stdout, after_destroy.stdout


def test_a_pod_the_template_does_not_fit_or_cannot_load_boots(kata: Kata, tmp_path: Path) -> None:
    template = tmp_path / "tpl"
    enable(kata, template)
    try:
        assert factory(kata, "init").returncode == 0
        hypervisor = tomllib.loads(kata.config_path.read_text())["hypervisor"]
        params = next(iter(hypervisor.values())).get("kernel_params", "") + " loglevel=1"
        enable(kata, template, kernel_params=params)  # the template booted without it
        status = factory(kata, "status")
        assert status.returncode == 1, explain(status)
        assert "not usable: the VM's command line differs from the template's: '-append " \
            "loglevel=1' where the template has '-append -'" in status.stdout, status.stdout
        res = run_rm(kata.cd, KATA, "tplmiss", "cat", "/proc/cmdline")
        assert res.returncode == 0 and "loglevel=1" in res.stdout, explain(res)
        log = shim_log(kata)
        assert RESTORED not in log and "does not fit it" in log, log[-3000:]

        # A template that fits but whose state QEMU cannot load: the pod boots instead.
        enable(kata, template)
        with open(template / "state", "r+b") as state:
            state.write(b"\0" * 8)  # the stream's magic and version: same size, not loadable
        res = run_rm(kata.cd, KATA, "tplbad", "true")
        assert res.returncode == 0, explain(res)
        log = shim_log(kata)
        assert "restoring from the VM template" in log and "failed, booting instead" in log, \
            log[-3000:]
        assert RESTORED not in log
    finally:
        assert factory(kata, "destroy").returncode == 0


def test_a_pod_with_limits_grows_from_the_smallest_template(kata: Kata, tmp_path: Path) -> None:
    """With memory hot-plug allowed, the template is the smallest VM a pod may get (1 vCPU,
    static_sandbox_base_memory) and a restored pod gets its limits' vCPUs and memory."""
    template = tmp_path / "tpl"
    enable(kata, template, memory_slots=2, default_maxvcpus=2)
    try:
        assert factory(kata, "init").returncode == 0
        meta = json.loads((template / "template.json").read_text())
        base = tomllib.loads(kata.config_path.read_text())["runtime"]["static_sandbox_base_memory"]
        assert (meta["vcpus"], meta["memory_mib"]) == (1, base), meta
        res = run_rm_args(kata.cd, KATA, ["--memory-limit", str(256 << 20), "--cpus", "2"],
                          "tplbig", "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
        assert res.returncode == 0, explain(res)
        nproc, _, mem_kib, _ = res.stdout.split()
        assert nproc == "2", res.stdout
        # About the limit (as a cold pod's: more than 90 % of it, less than limit + base).
        assert 0.9 * 256 * 1024 < int(mem_kib) <= (base + 256) * 1024, res.stdout
        log = shim_log(kata)
        assert RESTORED in log and f"2 vCPUs and {base + 256} MiB online" in log, log[-3000:]
    finally:
        assert factory(kata, "destroy").returncode == 0


def test_a_kubernetes_pod_with_limits_is_restored_with_its_cni_network(
        cri: tuple[Kata, Kubelet], tmp_path: Path) -> None:
    """Through CRI: RunPodSandbox on a restored VM, the pod's CNI veth hot-plugged as its
    NIC, its limits' memory hot-plugged, then the containers."""
    kata, kubelet = cri
    template = tmp_path / "tpl"
    enable(kata, template, memory_slots=2)
    try:
        assert factory(kata, "init").returncode == 0
        pod = kubelet.run_pod("tplpod", CRI_HANDLER, PodOptions(memory_limit_bytes=256 << 20))
        ip = kubelet.pod_status(pod.id).network.ip
        app = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
        res = kubelet.exec_sync(app, ["sh", "-c", "ip -o -4 addr show eth0; date +%s; "
                                      "ping -c 1 -W 5 " + cni_gateway(kata.cd.dir / "cni")
                                      + " >/dev/null && echo PING-OK"], timeout=90)
        out = res.stdout.decode()
        assert res.exit_code == 0 and f"inet {ip}/" in out and "PING-OK" in out, (res, out)
        assert abs(int(out.split()[-2]) - time.time()) < 60, out
        assert RESTORED in shim_log(kata), shim_log(kata)[-3000:]
        kubelet.stop_pod(pod.id)
        kubelet.remove_pod(pod.id)
    finally:
        assert factory(kata, "destroy").returncode == 0
