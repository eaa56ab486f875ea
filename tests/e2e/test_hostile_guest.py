"""Kata e2e: a hostile guest cannot touch the host through the share.

The attacker is a privileged container of the pod: root in the guest with CAP_SYS_ADMIN,
it mounts the share's virtio-fs tag itself and sees what virtiofsd exports. The host must
come out untouched: no file of it deleted, no mount redirected, nothing written into the
state directory (RAM) outside a container's own rootfs.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, explain, remove, wait_task_status

SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SHARE = "/mnt/share"
MOUNT_SHARE = (f"mkdir -p {SHARE} && (grep -q ' {SHARE} ' /proc/mounts || "
               f"mount -t virtiofs kataShared {SHARE})")


def run_in_pod(kata: Kata, cid: str, kind: str, *options: str) -> None:
    res = kata.cd.ctr("run", "-d", *options, "--runtime", KATA,
                      "--annotation", f"{SANDBOX_ID}=pod1",
                      "--annotation", f"{CONTAINER_TYPE}={kind}", IMAGE_REF, cid,
                      "sleep", "300", timeout=BOOT_TIMEOUT)  # fmt: skip
    assert res.returncode == 0, explain(res)
    assert wait_task_status(kata.cd, cid, ["RUNNING"], timeout=30) == "RUNNING"


def in_attacker(kata: Kata, script: str) -> tuple[int, str]:
    res = kata.cd.ctr("task", "exec", "--exec-id", f"x{uuid.uuid4().hex[:8]}", "pod1",
                      "sh", "-c", f"{MOUNT_SHARE} && {script}", timeout=BOOT_TIMEOUT)
    return res.returncode, res.stdout + res.stderr


def test_a_symlinked_container_dir_cannot_make_the_host_delete_files(
    kata: Kata, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "precious").write_text("host data")
    run_in_pod(kata, "pod1", "sandbox", "--privileged")
    run_in_pod(kata, "victim", "container")
    # Move the victim's directory away (its rootfs mount goes along) and put a link to a
    # host directory in its place; then let the host delete the victim.
    code, out = in_attacker(kata, f"mv {SHARE}/containers/victim {SHARE}/moved && "
                                  f"ln -s {canary} {SHARE}/containers/victim && echo DONE")
    remove(kata.cd, "victim")
    assert (canary / "precious").read_text() == "host data", f"the host deleted it: {out}"
    assert "DONE" not in out, f"the guest rewrote the share's top level: {out}"
    assert code != 0
    remove(kata.cd, "pod1")


def test_the_guest_can_write_nothing_outside_a_rootfs_of_its_own(kata: Kata) -> None:
    run_in_pod(kata, "pod1", "sandbox", "--privileged")
    targets = [f"{SHARE}/filler", f"{SHARE}/containers/filler",
               f"{SHARE}/containers/pod1/filler"]
    probes = " ; ".join(f"(dd if=/dev/zero of={t} bs=1k count=1 2>/dev/null && echo WROTE {t})"
                        for t in targets)  # fmt: skip
    code, out = in_attacker(kata, f"{probes} ; echo PROBED")
    assert "PROBED" in out, out
    assert "WROTE" not in out, f"the guest wrote into the state directory: {out}"
    # Its own rootfs is its to write: that lands on the container's snapshot, on disk.
    code, out = in_attacker(kata, f"echo ok > {SHARE}/containers/pod1/rootfs/tmp/mine && "
                                  f"cat {SHARE}/containers/pod1/rootfs/tmp/mine")
    assert code == 0 and "ok" in out, out
    remove(kata.cd, "pod1")


def test_endless_output_keeps_the_shim_small(kata: Kata) -> None:
    """A container that prints without end (16 MiB here, as fast as the guest can) is
    copied through, not buffered: the shim's memory stays where it was."""
    from benchmarks.soak import rss_kib

    run_in_pod(kata, "pod1", "sandbox")
    shim = kata.shim_daemons()[0].pid
    before = rss_kib(shim)
    res = kata.cd.ctr("task", "exec", "--exec-id", "flood", "pod1", "sh", "-c",
                      "head -c 16777216 /dev/zero | tr '\\0' y; echo; echo END",
                      timeout=BOOT_TIMEOUT)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("END\n") and len(res.stdout) > 16 << 20
    after = rss_kib(shim)
    assert after < before + 16 * 1024, f"shim RSS {before} -> {after} KiB"
    remove(kata.cd, "pod1")
