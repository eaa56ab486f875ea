"""`kata-runtime list` and `kata-runtime version` against the real stack.

One private containerd with its CRI plugin runs a sandbox started with `ctr` (in a
namespace of its own) and a pod started through CRI by the test kubelet; `list` shows both
running, and its JSON validates against docs/kata-runtime-list.schema.json. Then the ctr
sandbox's shim is killed with SIGKILL while containerd is stopped (SIGSTOP: otherwise its
clean-up, `shim delete`, can remove the sandbox before `list` looks), and `list` marks that
sandbox stale and only that one. Everything is then removed; the fixture's leak check runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jsonschema

from tests.harness import kataconfig, procs
from tests.harness.containerd import REPO, RUNTIME_BIN, VENV_BIN, Containerd, wait_task_status
from tests.harness.cri.client import Kubelet
from tests.harness.images import IMAGE_REF
from tests.harness.kata import CRI_HANDLER, CRI_NAMESPACE, Kata
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, explain

KATA_RUNTIME = RUNTIME_BIN / "kata-runtime"
SHIM = RUNTIME_BIN / "containerd-shim-kata-v2"
SCHEMA = json.loads((REPO / "docs" / "kata-runtime-list.schema.json").read_text())
CTR_NAMESPACE = "ktest-list"
SETTLE = 60.0


def kata_runtime(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(KATA_RUNTIME), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def listed(kata: Kata) -> dict[tuple[str, str], dict[str, Any]]:
    """`list --format json`, validated against the schema, keyed by (namespace, id)."""
    entries = json.loads(kata_runtime(kata.config_path, "list", "--format", "json").stdout)
    jsonschema.validate(entries, SCHEMA)
    return {(e["namespace"], e["id"]): e for e in entries}


@contextmanager
def stopped(cd: Containerd) -> Iterator[None]:
    """containerd frozen (SIGSTOP) for the block, so it cannot clean up a dead shim yet."""
    assert cd.proc is not None
    os.kill(cd.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(cd.proc.pid, signal.SIGCONT)


def run_ctr_sandbox(kata: Kata, image_tar: Path, cid: str) -> None:
    cd = kata.cd
    cd.ctr("image", "import", str(image_tar), namespace=CTR_NAMESPACE, check=True)
    res = cd.ctr("run", "-d", "--runtime", KATA, "--runtime-config-path", str(kata.config_path),
                 IMAGE_REF, cid, "sleep", "300", namespace=CTR_NAMESPACE, timeout=BOOT_TIMEOUT)
    assert res.returncode == 0, explain(res)
    status = wait_task_status(cd, cid, ["RUNNING"], timeout=30, namespace=CTR_NAMESPACE)
    assert status == "RUNNING", status


def test_list_shows_ctr_and_cri_sandboxes_and_marks_a_killed_shim_stale(
        cri: tuple[Kata, Kubelet], busybox_image: Path) -> None:
    kata, kubelet = cri
    ctr_key = (CTR_NAMESPACE, "t1")
    run_ctr_sandbox(kata, busybox_image, "t1")
    pod = kubelet.run_pod("listed", CRI_HANDLER)
    app = kubelet.start_container(pod, "app", IMAGE_REF, ["sleep", "300"])
    pod_key = (CRI_NAMESPACE, pod.id)

    entries = listed(kata)
    assert set(entries) == {ctr_key, pod_key}, entries
    for key in (ctr_key, pod_key):
        entry = entries[key]
        assert (entry["status"], entry["problem"]) == ("running", ""), entry
        assert entry["kernel"] == str(kataconfig.guest_kernel()), entry
        # The default (q35) boots the shared root image through its loader.
        guest = kataconfig.overrides_for_tests(kata.state_dir)[kataconfig.HYPERVISOR]
        assert (entry["initrd"], entry["image"]) == (guest["initrd"], guest.get("image", "")), \
            entry
        assert entry["guest_kernel"] == kata.guest_release, entry
        assert entry["vmm"]["pid"] in {p.pid for p in kata.qemu_processes()}, entry
    assert entries[ctr_key]["containers"] == ["t1"]
    assert app in entries[pod_key]["containers"], entries[pod_key]
    assert set(entries[pod_key]["containers"]) <= {pod.id, app}, entries[pod_key]
    ids = kata_runtime(kata.config_path, "list", "-q").stdout.splitlines()
    assert sorted(ids) == sorted(["t1", pod.id])
    table = kata_runtime(kata.config_path, "list", "--all").stdout.splitlines()
    assert table[0].split()[:3] == ["NAMESPACE", "ID", "STATUS"] and "INITRD" in table[0]
    assert any(line.split()[:3] == [CTR_NAMESPACE, "t1", "running"] for line in table), table

    shim_pid = entries[ctr_key]["shim"]["pid"]
    assert "containerd-shim-kata" in " ".join(procs.argv_of(shim_pid)), shim_pid
    with stopped(kata.cd):
        os.kill(shim_pid, signal.SIGKILL)
        assert procs.wait_until(lambda: procs.is_zombie(shim_pid), 10), "the shim still runs"
        entries = listed(kata)
    assert entries[ctr_key]["status"] == "stale", entries[ctr_key]
    assert entries[ctr_key]["problem"].startswith(f"stale: shim {shim_pid} "), entries[ctr_key]
    assert entries[pod_key]["status"] == "running", entries[pod_key]

    # containerd, running again, cleans up after the dead shim; then everything goes.
    stopped_status = wait_task_status(kata.cd, "t1", ["STOPPED", ""], timeout=SETTLE,
                                      namespace=CTR_NAMESPACE)
    assert stopped_status in ("STOPPED", ""), stopped_status
    kata.cd.ctr("task", "delete", "t1", namespace=CTR_NAMESPACE)
    res = kata.cd.ctr("container", "delete", "t1", namespace=CTR_NAMESPACE)
    assert res.returncode == 0, explain(res)
    kubelet.stop_pod(pod.id)
    kubelet.remove_pod(pod.id)
    assert procs.wait_until(lambda: not listed(kata), SETTLE), listed(kata)
    assert kata_runtime(kata.config_path, "list", "-q").stdout == ""


def expected_commit() -> str:
    """The source tree reports HEAD. A frozen bundle (`make test-frozen`) reports the commit
    it was built from (its BUILD_INFO: `make runtime` rebuilds only when its inputs change),
    which must be HEAD or one of its ancestors."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)

    head = git("rev-parse", "HEAD").stdout.strip()
    if VENV_BIN.resolve() == RUNTIME_BIN:
        return head
    info = json.loads((RUNTIME_BIN.parent / "BUILD_INFO").read_text())
    built = str(info["commit"]).removesuffix("-dirty")
    assert git("merge-base", "--is-ancestor", built, head).returncode == 0, (built, head)
    return built


def test_version_and_shim_v_print_the_same_build_and_guest_image(tmp_path: Path) -> None:
    config = kataconfig.write(tmp_path / "configuration.toml",
                              kataconfig.overrides_for_tests(tmp_path / "state"))
    cli = kata_runtime(config, "version").stdout
    shim = subprocess.run([str(SHIM), "-v"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KATA_CONF_FILE": str(config)}, check=True).stdout
    assert cli.splitlines()[0] == "kata-runtime:"
    assert shim.splitlines()[0] == "containerd-shim-kata-v2:"
    assert cli.splitlines()[1:] == shim.splitlines()[1:], (cli, shim)
    lines = shim.splitlines()
    assert lines[1].startswith("  Version:  ") and len(lines[1].split()) == 2, lines
    assert lines[2].split()[1].removesuffix("-dirty") == expected_commit(), lines
    manifest = kataconfig.GUEST_DIR / "MANIFEST"
    doc = json.loads(kata_runtime(config, "version", "--json").stdout)
    assert doc["guest_image"]["manifest"] == str(manifest), doc
    assert f"  Guest image: {manifest} (sha256 {doc['guest_image']['sha256']})" in lines
    outputs = [line for line in manifest.read_text().splitlines()
               if line.startswith(("vmlinux ", "vmlinuz ", "initrd.img "))]
    for line in outputs:  # what the manifest says of the image, as the file has it
        name, size, digest = line.split()
        assert f"    {name}: sha256 {digest} ({size} bytes)" in lines, (line, lines)
