"""The harness, proven with containerd's stock runc shim: the same checks the kata
acceptance tests make must pass here, and the leak checker must see real leaks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import images, leaks, mounts, procs, scenarios
from tests.harness.containerd import Containerd, shim_socket
from tests.harness.scenarios import RUNC, explain, run_detached, run_rm

CHECKS = [scenarios.check_echo, scenarios.check_exit_code,
          scenarios.check_stdout_stderr_apart, scenarios.check_stdin,
          scenarios.check_tty_size, scenarios.check_tty_resize, scenarios.check_exec,
          scenarios.check_ps, scenarios.check_kill_term, scenarios.check_kill_all,
          scenarios.check_missing_command, scenarios.check_duplicate_id,
          scenarios.check_pause_resume, scenarios.check_metrics,
          scenarios.check_id_reused_at_once]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_runc(containerd: Containerd, check: scenarios.Check) -> None:
    check(containerd, RUNC)


def test_image_is_deterministic() -> None:
    assert images.oci_archive() == images.oci_archive()


def test_image_listed_and_unpacked(containerd: Containerd) -> None:
    res = containerd.ctr("image", "ls")
    assert images.IMAGE_REF in res.stdout and "linux/amd64" in res.stdout, explain(res)
    res = containerd.ctr("image", "check")
    assert "complete" in res.stdout, explain(res)
    res = containerd.ctr("snapshot", "ls")
    assert "Committed" in res.stdout, explain(res)


def test_uname_is_the_hosts_under_runc(containerd: Containerd) -> None:
    res = run_rm(containerd, RUNC, "t1", "uname", "-r")
    assert (res.returncode, res.stdout.strip()) == (0, os.uname().release), explain(res)


def test_leak_checker_sees_a_running_shim(containerd: Containerd) -> None:
    """A container left running is reported: shim process, shim socket, mount, task."""
    before = leaks.snapshot(containerd)
    run_detached(containerd, RUNC, "t1", "sleep", "300")
    found = leaks.find_leaks(before)
    assert any("containerd-shim-runc-v2" in p for p in found.processes), found.report()
    assert any(str(shim_socket(containerd.address, containerd.namespace, "t1")) in s
               for s in found.sockets), found.report()
    assert any(m.endswith("/t1/rootfs") for m in found.mounts), found.report()
    assert "task t1 (RUNNING)" in found.containers, found.report()
    with pytest.raises(AssertionError, match="containerd-shim-runc-v2"):
        leaks.assert_no_leaks(before, timeout=0.5)
    scenarios.remove(containerd, "t1")
    leaks.assert_no_leaks(before)


def test_cleanup_after_crash(host_ready: None, busybox_image: Path) -> None:
    """containerd killed -9 with a task running: close() still removes everything,
    including the container's own process (which outlives its shim)."""
    with Containerd() as cd:
        cd.import_image(busybox_image, images.IMAGE_REF)
        before = leaks.snapshot(cd)
        run_detached(cd, RUNC, "t1", "sleep", "300")
        sleeper = scenarios.task_pid(cd, "t1")
        assert procs.argv_of(sleeper) == ("sleep", "300")
        assert cd.proc is not None
        cd.proc.kill()
        cd.proc.wait(10)
    assert not procs.alive(sleeper), f"container process {sleeper} outlived cleanup"
    assert not [p for p in procs.processes() if cd.address in p.argv]
    assert not mounts.mounts_under([str(cd.dir)])
    assert not cd.dir.exists()
    assert not shim_socket(cd.address, cd.namespace, "t1").exists()
    assert not cd.runc_state()
    assert not leaks.find_leaks(before, check_containers=False)


def test_ctr_timeout_fails_instead_of_hanging(containerd: Containerd) -> None:
    with pytest.raises(AssertionError, match="did not finish within"):
        containerd.ctr("run", "--rm", "--runtime", RUNC, images.IMAGE_REF, "t1", "sleep", "30",
                       timeout=2)
    scenarios.remove(containerd, "t1")


def test_runtime_not_found_is_reported(containerd: Containerd) -> None:
    res = containerd.ctr("run", "--rm", "--runtime", "io.containerd.nosuch.v2",
                         images.IMAGE_REF, "t1", "true")
    assert res.returncode != 0, explain(res)
    assert "containerd-shim-nosuch-v2" in res.stderr, explain(res)


def test_ctr_version_talks_to_our_containerd(containerd: Containerd) -> None:
    res = subprocess.run(["ctr", "--address", containerd.address, "version"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0 and "Server:" in res.stdout, res
