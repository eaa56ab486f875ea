"""Kata acceptance tests: `ctr` driving containerd-shim-kata-v2 (one QEMU VM per pod).

The runtime-independent checks are the ones test_harness_runc.py proves with runc; here
they run with io.containerd.kata.v2, plus what only a VM can show (the guest's kernel, the
QEMU process). The `kata` fixture asserts after every test that no QEMU, virtiofsd, shim,
mount, socket or sandbox state dir is left.
"""

from __future__ import annotations

import os

import pytest

from tests.harness import scenarios
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, detached, explain, run_rm


def test_uname_prints_the_guest_kernel(kata: Kata) -> None:
    host = os.uname().release
    assert kata.guest_release != host, (
        f"guest kernel release {kata.guest_release!r} equals the host's: this test could "
        "not tell a VM from a plain container")
    res = run_rm(kata.cd, KATA, "t1", "uname", "-r")
    assert res.returncode == 0, explain(res)
    assert res.stdout.strip() == kata.guest_release, explain(res)


def test_a_qemu_vm_runs_the_sandbox(kata: Kata) -> None:
    cid = "ktest-sleeper"
    with detached(kata.cd, KATA, cid, "sleep", "30"):
        qemus = kata.qemu_processes()
        assert any(cid in p.cmdline for p in qemus), (
            f"no qemu-system process naming sandbox {cid}; ours: {qemus}")
        assert any(d.name == cid for d in kata.sandbox_dirs()), kata.sandbox_dirs()
        assert len(kata.shim_daemons()) == 1, kata.shim_daemons()
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", cid, "uname", "-r")
        assert res.stdout.strip() == kata.guest_release, explain(res)


@pytest.mark.parametrize("check", [
    scenarios.check_echo,
    scenarios.check_exit_code,
    scenarios.check_stdout_stderr_apart,
    scenarios.check_stdin,
    scenarios.check_tty_size,
    scenarios.check_tty_resize,
    scenarios.check_exec,
    scenarios.check_ps,
    scenarios.check_kill_term,
    scenarios.check_kill_all,
    scenarios.check_pause_resume,
    scenarios.check_metrics,
    scenarios.check_id_reused_at_once,
], ids=lambda c: c.__name__.removeprefix("check_"))
def test_kata(kata: Kata, check: scenarios.Check) -> None:
    check(kata.cd, KATA)


def test_three_pods_at_once_each_in_its_own_vm(kata: Kata) -> None:
    import subprocess
    import time

    from tests.harness.images import IMAGE_REF
    from tests.harness.scenarios import BOOT_TIMEOUT

    argvs = [kata.cd.ctr_argv("run", "--rm", "--runtime", KATA, IMAGE_REF, f"p{i}",
                              "sh", "-c", f"echo hello-{i}") for i in range(3)]
    runs = [subprocess.Popen(a, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for a in argvs]
    seen_vms = 0
    try:
        while any(r.poll() is None for r in runs):
            seen_vms = max(seen_vms, len(kata.qemu_processes()))
            if seen_vms == 3:
                break
            time.sleep(0.1)
        outputs = [r.communicate(timeout=BOOT_TIMEOUT) for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                r.kill()
                r.wait()
    for i, (r, (out, err)) in enumerate(zip(runs, outputs, strict=True)):
        assert (r.returncode, out) == (0, f"hello-{i}\n"), err
    assert seen_vms == 3, f"expected three VMs running at once, saw at most {seen_vms}"
