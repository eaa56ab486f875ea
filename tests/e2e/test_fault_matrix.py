"""Kata e2e fault matrix: kill -9 of QEMU, virtiofsd, the shim or containerd, and a panic
of the guest kernel, each during a pod's create, exec and delete.

Afterwards containerd's view must agree with reality (no task reported RUNNING whose VM
is gone), everything must be deletable, and the kata fixture's leak check must find no
process, mount, socket or state directory of ours.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.harness import procs
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, explain, wait_task_status

VICTIMS = ("qemu", "virtiofsd", "shim", "containerd", "guest-panic")
PHASES = ("create", "exec", "delete")
# The guest can panic itself only once a container runs in it: no (guest-panic, create).
# `make soak` repeats the whole matrix (KATA_FAULT_ROUNDS); `make test` runs it once.
ROUNDS = int(os.environ.get("KATA_FAULT_ROUNDS", "1"))
CASES = [(v, p, r) for r in range(ROUNDS) for v in VICTIMS for p in PHASES
         if (v, p) != ("guest-panic", "create")]
SETTLE = 30.0  # seconds for the shim to notice and report


def victim_pids(kata: Kata, victim: str) -> list[int]:
    scope = [str(kata.cd.dir)]
    if victim == "qemu":
        return [p.pid for p in kata.qemu_processes()]
    if victim == "virtiofsd":
        return [p.pid for p in procs.matching(("virtiofsd",), scope=scope)]
    if victim == "shim":
        return [p.pid for p in kata.shim_daemons()]
    assert kata.cd.proc is not None
    return [kata.cd.proc.pid]


def strike(kata: Kata, victim: str) -> None:
    """The fault itself."""
    if victim == "guest-panic":  # a privileged container crashes the guest kernel
        kata.cd.ctr("task", "exec", "--exec-id", "panic", "t1", "sh", "-c",
                    "echo c > /proc/sysrq-trigger", timeout=20, check_timeout=False)
        return
    pids = victim_pids(kata, victim)
    assert pids, f"no {victim} process to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    if victim == "containerd":
        assert kata.cd.proc is not None
        kata.cd.proc.wait(10)
        kata.cd.restart()  # as a service manager would: running shims are adopted again


def run_t1(kata: Kata) -> subprocess.Popen[bytes]:
    return kata.cd.ctr_popen("run", "-d", "--privileged", "--runtime", KATA, IMAGE_REF, "t1",
                             "sleep", "300", stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip


def consistent(kata: Kata) -> bool:
    """Every task containerd calls RUNNING has a VM behind it."""
    running = [cid for cid, status in kata.cd.tasks().items() if status == "RUNNING"]
    return not running or len(kata.qemu_processes()) >= 1


@pytest.mark.parametrize(("victim", "phase", "round_"), CASES)
def test_a_fault_ends_cleanly(kata: Kata, victim: str, phase: str, round_: int) -> None:
    started = None
    if phase == "create":
        started = run_t1(kata)
        wanted = "containerd" if victim == "containerd" else victim
        # Strike while the VM boots: as soon as the victim exists.
        assert procs.wait_until(lambda: bool(victim_pids(kata, wanted)), BOOT_TIMEOUT)
        strike(kata, victim)
    else:
        started = run_t1(kata)
        assert started.wait(BOOT_TIMEOUT) == 0
        assert wait_task_status(kata.cd, "t1", ["RUNNING"], timeout=30) == "RUNNING"
        if phase == "exec":
            execing = kata.cd.ctr_popen("task", "exec", "--exec-id", "e1", "t1", "sleep", "300",
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            strike(kata, victim)
            execing.kill()
            execing.wait()
        else:
            killing = kata.cd.ctr_popen("task", "kill", "-s", "SIGKILL", "t1")
            strike(kata, victim)
            killing.wait(30)
    started.wait(BOOT_TIMEOUT)  # `ctr run -d` ends by itself (a failed create included)

    # containerd's view agrees with reality once the shim has had time to notice.
    assert procs.wait_until(lambda: consistent(kata), SETTLE), (
        f"tasks {kata.cd.tasks()} but VMs {kata.qemu_processes()}")
    # And everything can be taken down: the fixture then checks nothing is left.
    if "t1" in kata.cd.tasks():
        kata.cd.ctr("task", "kill", "-s", "SIGKILL", "t1")
        procs.wait_until(lambda: kata.cd.tasks().get("t1") != "RUNNING", SETTLE)
        res = kata.cd.ctr("task", "delete", "--force", "t1", timeout=60)
        assert res.returncode == 0 or "not found" in res.stderr, explain(res)
    if "t1" in kata.cd.containers():
        res = kata.cd.ctr("container", "delete", "t1")
        assert res.returncode == 0, explain(res)
