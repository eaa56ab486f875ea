"""Bad input gets a clear error naming its cause, and leaves nothing behind (the `kata`
fixture checks for leftover QEMU/virtiofsd/shim processes, mounts, sockets, state dirs)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from tests.harness import kataconfig, procs, scenarios
from tests.harness.containerd import RUNTIME_BIN
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, explain, run_detached, run_rm

MISSING_KERNEL = "/no/such/dir/vmlinuz-ktest"


def test_missing_kernel_is_named(kata: Kata) -> None:
    kata.write_config({kataconfig.HYPERVISOR: {"kernel": MISSING_KERNEL}})
    res = run_rm(kata.cd, KATA, "t1", "true")
    assert res.returncode != 0, explain(res)
    assert MISSING_KERNEL in res.stderr, explain(res)
    assert "t1" not in kata.cd.containers(), "ctr run --rm left its container"


def test_a_hypervisor_binary_that_cannot_run_is_named_with_key_path_and_file(
        kata: Kata, tmp_path: Path) -> None:
    """At sandbox creation, and in `kata-runtime check` on the same file."""
    section = kataconfig.HYPERVISOR
    not_exe = tmp_path / "vmm-not-executable"
    not_exe.write_text("#!/bin/sh\n")
    for path, problem in ((tmp_path / "no-such-vmm", "does not exist"),
                          (not_exe, "is not executable")):
        config = kata.write_config({section: {"path": str(path)}})
        expected = f"{section}.path: {path} {problem}"
        res = run_rm(kata.cd, KATA, "t1", "true")
        assert res.returncode != 0, explain(res)
        assert expected in res.stderr and f"(in {config})" in res.stderr, explain(res)
        check = subprocess.run([str(RUNTIME_BIN / "kata-runtime"), "--config", str(config),
                                "check"], capture_output=True, text=True, timeout=60)
        assert check.returncode == 1, check.stdout + check.stderr
        fails = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
        assert any(expected in line and str(config) in line for line in fails), check.stdout
        assert not kata.qemu_processes()


def test_missing_command_is_named(kata: Kata) -> None:
    scenarios.check_missing_command(kata.cd, KATA)


def test_duplicate_id_is_refused(kata: Kata) -> None:
    scenarios.check_duplicate_id(kata.cd, KATA)


def test_shim_killed_leaves_nothing(kata: Kata) -> None:
    """SIGKILL the shim daemon: containerd notices, runs `shim delete`, and that must take
    down QEMU and virtiofsd and remove the sandbox's state."""
    cd, cid = kata.cd, "t1"
    run_detached(cd, KATA, cid, "sleep", "300")
    daemons = kata.shim_daemons()
    assert len(daemons) == 1, f"expected one shim daemon, found {daemons}"
    assert kata.qemu_processes(), "no QEMU for the running container"
    os.kill(daemons[0].pid, signal.SIGKILL)

    gone = procs.wait_until(lambda: not procs.matching(
        ("qemu-system", "virtiofsd", "containerd-shim-kata-v2"), scope=[str(cd.dir)]), 30)
    assert gone, f"left 30 s after the shim was killed: {kata.qemu_processes()}"
    assert procs.wait_until(lambda: not kata.sandbox_dirs(), 30), kata.sandbox_dirs()
    assert procs.wait_until(lambda: cd.tasks().get(cid) != "RUNNING", 30), cd.tasks()
    cd.ctr("task", "delete", cid)
    res = cd.ctr("container", "delete", cid)
    assert res.returncode == 0, explain(res)


def test_vm_killed_stops_the_task_and_leaves_nothing(kata: Kata) -> None:
    """SIGKILL QEMU under a running container: the task must stop (no Wait hangs), and
    deleting it must clean up virtiofsd, mounts and state like a normal end."""
    cd, cid = kata.cd, "t1"
    run_detached(cd, KATA, cid, "sleep", "300")
    qemus = kata.qemu_processes()
    assert len(qemus) == 1, f"expected one QEMU, found {qemus}"
    os.kill(qemus[0].pid, signal.SIGKILL)
    assert procs.wait_until(lambda: cd.tasks().get(cid) == "STOPPED", 30), cd.tasks()
    res = cd.ctr("task", "delete", cid)
    assert res.returncode == 0, explain(res)
    res = cd.ctr("container", "delete", cid)
    assert res.returncode == 0, explain(res)
    gone = procs.wait_until(lambda: not procs.matching(
        ("qemu-system", "virtiofsd", "containerd-shim-kata-v2"), scope=[str(cd.dir)]), 30)
    assert gone, "QEMU, virtiofsd or the shim outlived the deleted task"


def test_virtiofsd_killed_ends_the_pod_within_seconds(kata: Kata) -> None:
    """SIGKILL virtiofsd under a running container: the VM cannot serve its files any
    more, so the shim ends it; the task stops quickly and deletes without a timeout."""
    import time

    cd, cid = kata.cd, "t1"
    run_detached(cd, KATA, cid, "sleep", "300")
    daemons = procs.matching(("virtiofsd",), scope=[str(cd.dir)])
    assert len(daemons) >= 1, "no virtiofsd for the running container"
    killed = time.monotonic()
    for daemon in daemons:
        os.kill(daemon.pid, signal.SIGKILL)
    assert procs.wait_until(lambda: cd.tasks().get(cid) == "STOPPED", 15), cd.tasks()
    stopped_after = time.monotonic() - killed
    res = cd.ctr("task", "delete", cid, timeout=20)
    assert res.returncode == 0, explain(res)
    assert cd.ctr("container", "delete", cid).returncode == 0
    assert stopped_after < 15, stopped_after
    gone = procs.wait_until(lambda: not procs.matching(
        ("qemu-system", "virtiofsd", "containerd-shim-kata-v2"), scope=[str(cd.dir)]), 30)
    assert gone, "QEMU, virtiofsd or the shim outlived the deleted task"


def test_9p_share_on_a_kernel_without_9p_is_named(kata: Kata) -> None:
    """The cloud guest kernel has no 9p: asking for it must fail clearly, not hang."""
    kata.write_config({kataconfig.HYPERVISOR: {"shared_fs": "virtio-9p"}})
    res = run_rm(kata.cd, KATA, "t1", "true")
    assert res.returncode != 0, explain(res)
    assert "9p" in res.stderr, explain(res)
    assert "t1" not in kata.cd.containers(), "ctr run --rm left its container"
