"""The shared read-only root image (``image`` in [hypervisor.qemu], the default on q35):
every pod's VM maps the same file read-only (virtio-pmem) and its guest mounts it with DAX.

What matters to a user: pods run from it; a hostile guest kernel that writes to the device
changes nothing on the host or in its neighbours; a broken image fails the pod with the
loader's own message and leaves nothing behind; the whole initrd still boots on q35.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.e2e.test_debug_console import ENABLED, _exec_argv
from tests.harness import kataconfig
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, detached, explain, run_rm

IMAGE = kataconfig.GUEST_DIR / "rootfs.img"
LOADER = kataconfig.GUEST_DIR / "rootfs-loader.img"
#: Seconds for the guest shell to run the script under TCG.
ANSWER = 120.0
#: Run as root in the guest over the debug console: where / comes from; then a write to
#: the image's device (its last block: free space, so the guest keeps working), pushed to
#: the device and read back from it with the guest's caches dropped.
HOSTILE = r"""
awk '$2 == "/" { print "root:", $1, $3, $4 }' /proc/mounts
last=$(( $(blockdev --getsize64 /dev/pmem0) / 4096 - 1 ))
printf guest-was-here | dd of=/dev/pmem0 bs=4096 seek=$last conv=sync,fsync 2>&1
echo write-rc=$?
sync; echo 3 > /proc/sys/vm/drop_caches
echo "readback=$(dd if=/dev/pmem0 bs=4096 skip=$last count=1 2>/dev/null | tr -d '\0')."
echo done-$((6*7))
"""

pytestmark = pytest.mark.skipif(
    not kataconfig.is_qemu() or kataconfig.BASE_HYPERVISOR.get("machine_type") == "microvm",
    reason="the root image is a virtio-pmem device: QEMU on a PCI machine (q35) only")


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def image_config(image: Path = IMAGE, loader: Path = LOADER) -> dict[str, dict[str, object]]:
    return {kataconfig.HYPERVISOR: {"image": str(image), "initrd": str(loader)}}


def test_pods_share_the_image_and_a_guest_cannot_write_it(kata: Kata) -> None:
    require(IMAGE.is_file() and LOADER.is_file(), f"{IMAGE} and {LOADER} (run `make guest`)")
    kata.write_config(ENABLED, image_config())
    before = (sha256(IMAGE), IMAGE.stat().st_mtime_ns)
    with detached(kata.cd, KATA, "img1", "sleep", "300"), \
            detached(kata.cd, KATA, "img2", "sleep", "300"):
        qemus = kata.qemu_processes()
        assert len(qemus) == 2, qemus
        for qemu in qemus:
            assert (f"memory-backend-file,id=rootimg,mem-path={IMAGE},"
                    f"size={IMAGE.stat().st_size},share=on,readonly=on") in qemu.cmdline
            assert "virtio-pmem-pci,memdev=rootimg" in qemu.cmdline
            # The one file, mapped by each VM, never for writing.
            maps = [line.split() for line in
                    Path(f"/proc/{qemu.pid}/maps").read_text().splitlines()
                    if line.endswith(str(IMAGE))]
            assert maps and all(m[1].startswith("r-") for m in maps), maps

        shell = subprocess.run(_exec_argv(kata, "img1"), input=HOSTILE, capture_output=True,
                               text=True, timeout=ANSWER, check=False)
        assert "done-42" in shell.stdout, shell
        root = next(line for line in shell.stdout.splitlines() if line.startswith("root:"))
        fields = root.split()
        assert fields[1:3] == ["/dev/pmem0", "ext4"], root
        assert "dax=always" in fields[3] and fields[3].startswith("ro,"), root
        # The write "succeeds" in the guest, and the device drops it: read back from the
        # device, the block is as it was (free space: zeros).
        assert "write-rc=0" in shell.stdout, shell.stdout
        assert "readback=." in shell.stdout, shell.stdout

        # The neighbour's guest runs its programs from the same image, unharmed.
        res = kata.cd.ctr("task", "exec", "--exec-id", "after", "img2", "echo", "unharmed")
        assert (res.returncode, res.stdout) == (0, "unharmed\n"), explain(res)
    assert (sha256(IMAGE), IMAGE.stat().st_mtime_ns) == before, "a guest changed the image"


def test_a_broken_image_fails_the_pod_with_the_loaders_message(kata: Kata,
                                                               tmp_path: Path) -> None:
    require(LOADER.is_file(), f"{LOADER} (run `make guest`)")
    broken = tmp_path / "broken.img"
    with broken.open("wb") as f:
        f.truncate(IMAGE.stat().st_size)  # the right size, no filesystem
    kata.write_config(image_config(image=broken))
    res = run_rm(kata.cd, KATA, "imgbad", "true")
    assert res.returncode != 0, explain(res)
    assert "the VM exited while booting" in res.stderr, explain(res)
    assert "kata-loader: cannot mount /dev/pmem0" in res.stderr, explain(res)
    assert kata.qemu_processes() == []


def test_the_whole_initrd_still_boots_on_q35(kata: Kata) -> None:
    """``image = ""``: the guest's files in its own initramfs, as on microvm."""
    kata.write_config({kataconfig.HYPERVISOR: {
        "image": "", "initrd": str(kataconfig.GUEST_DIR / "initrd.img")}})
    res = run_rm(kata.cd, KATA, "initrd1", "sh", "-c", "echo from-the-initrd")
    assert (res.returncode, res.stdout) == (0, "from-the-initrd\n"), explain(res)
    assert kata.qemu_processes() == []
