"""Kata e2e: containers of one pod (CRI's sandbox-id annotation) share one shim and one VM;
deleting a container leaves the pod running; deleting the sandbox ends the VM."""

from __future__ import annotations

from pathlib import Path

from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, explain, remove, wait_task_status

SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"


def run_in_pod(kata: Kata, cid: str, kind: str) -> None:
    res = kata.cd.ctr("run", "-d", "--runtime", KATA, "--annotation", f"{SANDBOX_ID}=pod1",
                      "--annotation", f"{CONTAINER_TYPE}={kind}", IMAGE_REF, cid,
                      "sleep", "300", timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    assert wait_task_status(kata.cd, cid, ["RUNNING"], timeout=30) == "RUNNING"


def boot_id(kata: Kata, cid: str) -> str:
    res = kata.cd.ctr("task", "exec", "--exec-id", "boot", cid,
                      "cat", "/proc/sys/kernel/random/boot_id")
    assert res.returncode == 0, explain(res)
    return res.stdout.strip()


def test_a_pod_shares_one_vm(kata: Kata) -> None:
    run_in_pod(kata, "pod1", "sandbox")
    run_in_pod(kata, "c2", "container")
    assert len(kata.qemu_processes()) == 1, kata.qemu_processes()
    assert len(kata.shim_daemons()) == 1, kata.shim_daemons()
    assert boot_id(kata, "pod1") == boot_id(kata, "c2"), "the containers run in different VMs"

    remove(kata.cd, "c2")
    assert kata.cd.tasks().get("pod1") == "RUNNING", "deleting a container stopped the pod"
    assert len(kata.qemu_processes()) == 1
    remove(kata.cd, "pod1")  # the kata fixture then checks that nothing is left


def test_a_running_pod_survives_a_containerd_restart(kata: Kata) -> None:
    from tests.harness.scenarios import run_detached

    run_detached(kata.cd, KATA, "t1", "sleep", "300")
    qemu_before = [p.pid for p in kata.qemu_processes()]
    kata.cd.restart()
    assert kata.cd.tasks().get("t1") == "RUNNING", kata.cd.tasks()
    assert [p.pid for p in kata.qemu_processes()] == qemu_before, "the VM was replaced"
    assert boot_id(kata, "t1"), "exec after the restart failed"
    remove(kata.cd, "t1")


def test_the_same_id_in_two_namespaces_is_two_sandboxes(kata: Kata, busybox_image: Path) -> None:
    from tests.harness.scenarios import run_detached

    other = f"{kata.cd.namespace}-b"
    kata.cd.ctr("image", "import", str(busybox_image), namespace=other, check=True)
    run_detached(kata.cd, KATA, "t1", "sleep", "300")
    res = kata.cd.ctr("run", "-d", "--runtime", KATA, IMAGE_REF, "t1", "sleep", "300",
                      namespace=other, timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    assert len(kata.qemu_processes()) == 2, kata.qemu_processes()
    # Taking t1 down in the other namespace (`shim delete` runs for it) spares this one.
    kata.cd.ctr("task", "kill", "-s", "SIGKILL", "t1", namespace=other, check=True)
    assert wait_task_status(kata.cd, "t1", ["STOPPED"], timeout=30, namespace=other)
    kata.cd.ctr("task", "delete", "t1", namespace=other, check=True)
    kata.cd.ctr("container", "delete", "t1", namespace=other, check=True)
    assert kata.cd.tasks().get("t1") == "RUNNING", kata.cd.tasks()
    assert len(kata.qemu_processes()) == 1
    assert boot_id(kata, "t1"), "exec in the surviving sandbox failed"
    remove(kata.cd, "t1")
