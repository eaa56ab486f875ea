"""The pod's cgroup on the host (hostos/cgroups.py): the parts that need no real cgroupfs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hostos import cgroups

V1 = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_v1_uses_the_accounting_controllers_only() -> None:
    assert [h.mount_point for h in cgroups.hierarchies(V1)] == [
        "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids"]


def test_v2_is_the_one_unified_hierarchy() -> None:
    assert cgroups.hierarchies(V2) == [cgroups.Hierarchy("/sys/fs/cgroup", v2=True)]


@pytest.mark.parametrize("path", ["", "/", "relative/x", "/a/../b", "/a//b", "/a/b/",
                                  "x:y", "a.slice:cri:../x", "kubepods.slice:cri:a/b",
                                  "notaslice:cri:abc", "a--b.slice:cri:abc"])
def test_only_plain_cgroupfs_paths_are_used(path: str) -> None:
    assert cgroups.checked_path(path) is None


def test_the_cgroup_is_made_only_under_an_existing_pod_cgroup(tmp_path: Path) -> None:
    for name in ("cpu", "memory"):
        (tmp_path / name / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "pids").mkdir()  # no pod cgroup there: not ours to make
    found = [cgroups.Hierarchy(str(tmp_path / n), v2=False) for n in ("cpu", "memory", "pids")]
    cg = cgroups.HostCgroup.make("/kubepods/pod1/sandbox", found)
    assert cg.dirs == (str(tmp_path / "cpu/kubepods/pod1/sandbox"),
                       str(tmp_path / "memory/kubepods/pod1/sandbox"))
    assert not (tmp_path / "pids" / "kubepods").exists()
    cg.remove()
    assert not any(os.path.exists(d) for d in cg.dirs)
    assert (tmp_path / "cpu/kubepods/pod1").is_dir()  # the pod's own cgroup stays


def test_children_and_grandchildren_are_found() -> None:
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(kids := cgroups.children(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in cgroups.children(os.getpid())
        assert len(kids) == 1 and kids[0] in cgroups.children(os.getpid())
    finally:
        os.killpg(child.pid, 9)
        child.wait()


def test_own_cgroups_map_each_hierarchy_to_this_process_s_directory() -> None:
    proc = ("9:name=systemd:/\n8:pids:/\n4:memory:/process_api/a9\n2:cpuacct:/\n1:cpu:/\n"
            "0::/\n")
    places = cgroups.own_cgroups(proc, cgroups.hierarchies(V1))
    assert places == {"/sys/fs/cgroup/cpu": "/sys/fs/cgroup/cpu",
                      "/sys/fs/cgroup/cpuacct": "/sys/fs/cgroup/cpuacct",
                      "/sys/fs/cgroup/memory": "/sys/fs/cgroup/memory/process_api/a9",
                      "/sys/fs/cgroup/pids": "/sys/fs/cgroup/pids"}
    assert cgroups.own_cgroups("0::/user.slice/x\n", cgroups.hierarchies(V2)) == {
        "/sys/fs/cgroup": "/sys/fs/cgroup/user.slice/x"}


def test_systemd_paths_become_the_units_cgroupfs_directory() -> None:
    path = "kubepods-burstable-pod1f2e.slice:cri-containerd:abc123"
    assert cgroups.checked_path(path) == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f2e.slice/"
        "cri-containerd-abc123.scope")
    assert cgroups.checked_path("system.slice:cri:abc") == "/system.slice/cri-abc.scope"
