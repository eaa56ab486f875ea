"""QEMU's microvm machine, end to end: the shipped configuration-qemu-microvm.toml behind
its runtime variant (``io.containerd.kata-qemu-microvm.v2``, the shim named
containerd-shim-kata-qemu-microvm-v2) and its CRI handler ``kata-qemu-microvm``.

`make test` runs this subset: boot, exec, tty, kill, pause, metrics, a volume, a CRI pod of
two containers, a grown CPU limit (no hot-plug there), and the clean-up the fixtures check.
`make test-microvm` runs the whole e2e suite on the microvm configuration.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cri import CGROUP_FILE, out
from tests.harness import scenarios
from tests.harness.cri.client import ContainerOptions, Kubelet, PodOptions
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata, kata_cri_containerd
from tests.harness.kataconfig import REPO
from tests.harness.scenarios import detached, explain, run_rm_args

VARIANT = "qemu-microvm"
RUNTIME = f"io.containerd.kata-{VARIANT}.v2"
HANDLER = f"kata-{VARIANT}"
SHIPPED = REPO / f"configuration-{VARIANT}.toml"


@pytest.fixture
def microvm(kata: Kata) -> Kata:
    """The `kata` containerd with the microvm variant's configuration beside the default."""
    kata.write_variant_config(VARIANT, SHIPPED)
    return kata


@pytest.fixture
def microvm_cri(guest_release: str, request: pytest.FixtureRequest
                ) -> Iterator[tuple[Kata, Kubelet]]:
    from tests.e2e.conftest import leak_checked

    with kata_cri_containerd(variants={VARIANT: SHIPPED}) as kata, \
            leak_checked(kata.cd, request, kata.state_dir):
        kubelet = Kubelet(kata.cd.address, kata.cd.dir / "pod-logs")
        try:
            yield kata, kubelet
        finally:
            kubelet.remove_all()
            kubelet.close()


def exec_out(kata: Kata, cid: str, *cmd: str) -> str:
    res = kata.cd.ctr("task", "exec", "--exec-id", "probe", cid, *cmd)
    assert res.returncode == 0, explain(res)
    return res.stdout.strip()


def test_the_variant_boots_a_microvm_without_pci(microvm: Kata) -> None:
    cid = "mvm"
    with detached(microvm.cd, RUNTIME, cid, "sleep", "120"):
        (qemu,) = microvm.qemu_processes()
        argv = qemu.argv
        machine = argv[argv.index("-machine") + 1]
        assert machine.startswith("microvm,"), machine
        devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
        assert devices and not [d for d in devices if "-pci" in d.split(",")[0]], devices
        assert exec_out(microvm, cid, "uname", "-r") == microvm.guest_release
        # The guest has no PCI bus at all; its virtio devices sit on virtio-mmio.
        pci = exec_out(microvm, cid, "sh", "-c", "ls -A /sys/bus/pci/devices 2>/dev/null")
        assert pci == "", f"PCI devices in a microvm guest: {pci}"
        virtio = exec_out(microvm, cid, "ls", "/sys/bus/virtio/devices").split()
        assert len(virtio) >= 2, virtio  # the agent's serial port and the virtio-fs share
        modalias = exec_out(microvm, cid, "sh", "-c",
                            "cat /sys/bus/platform/devices/*/modalias 2>/dev/null")
        assert "LNRO0005" in modalias, modalias  # virtio-mmio, described in microvm's ACPI


@pytest.mark.parametrize("check", [
    scenarios.check_echo,
    scenarios.check_stdin,
    scenarios.check_tty_size,
    scenarios.check_exec,
    scenarios.check_kill_term,
    scenarios.check_pause_resume,
    scenarios.check_metrics,
], ids=lambda c: c.__name__.removeprefix("check_"))
def test_microvm(microvm: Kata, check: scenarios.Check) -> None:
    check(microvm.cd, RUNTIME)


def test_a_volume_reaches_a_microvm_container(microvm: Kata, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "in").write_text("from the host\n")
    mount = f"type=bind,src={vol},dst=/v,options=rbind:rw"
    res = run_rm_args(microvm.cd, RUNTIME, ["--mount", mount], "mvol",
                      "sh", "-c", "cat /v/in; echo from-guest > /v/out")
    assert res.returncode == 0, explain(res)
    assert res.stdout == "from the host\n"
    assert (vol / "out").read_text() == "from-guest\n"


def test_a_cri_pod_on_the_microvm_handler(microvm_cri: tuple[Kata, Kubelet]) -> None:
    kata, kubelet = microvm_cri
    one_cpu = {"cpu_quota": 100000, "cpu_period": 100000}
    pod = kubelet.run_pod("tiny", HANDLER, PodOptions(**one_cpu))
    cids = [kubelet.start_container(pod, f"c{i}", IMAGE_REF, ["sleep", "300"],
                                    ContainerOptions(**one_cpu)) for i in range(2)]
    (qemu,) = kata.qemu_processes()
    assert "microvm," in qemu.cmdline, qemu.cmdline
    boot_ids = {out(kubelet, c, ["cat", "/proc/sys/kernel/random/boot_id"]) for c in cids}
    assert len(boot_ids) == 1, "the pod's containers are in different VMs"
    # microvm cannot hot-plug: a grown CPU limit is applied in the guest's cgroup, the VM
    # keeps its one vCPU, and the pod goes on.
    from tests.harness.cri.api_pb2 import LinuxContainerResources

    kubelet.update_resources(cids[0], LinuxContainerResources(cpu_quota=200000,
                                                              cpu_period=100000))
    cpu_max = out(kubelet, cids[0], ["sh", "-c", CGROUP_FILE.format(name="cpu.max")])
    assert cpu_max == "200000 100000", cpu_max
    assert out(kubelet, cids[0], ["nproc"]) == "1"
    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)
