"""The guest kernel's two forms with QEMU: the uncompressed ELF ``vmlinux`` (the shipped
default, entered through its PVH entry point) and the bzImage ``vmlinuz``.

What matters to a user: pods boot from the default; a configuration naming the bzImage
still works; an ELF kernel QEMU cannot enter is refused with the key, the file and the fix
before any VM starts, by the shim and by `kata-runtime check`, leaving nothing behind.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require
from tests.harness import kataconfig
from tests.harness.containerd import RUNTIME_BIN
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, detached, explain, run_rm

pytestmark = pytest.mark.skipif(not kataconfig.is_qemu(), reason="QEMU's -kernel forms")


def qemu_kernel(kata: Kata) -> str:
    (qemu,) = kata.qemu_processes()
    return qemu.argv[qemu.argv.index("-kernel") + 1]


def test_the_default_boots_the_elf_kernel(kata: Kata) -> None:
    vmlinux = kataconfig.GUEST_DIR / "vmlinux"
    require(vmlinux.is_file(), f"{vmlinux} (run `make guest`)")
    kata.write_config()
    with detached(kata.cd, KATA, "elf1", "sleep", "300"):
        assert qemu_kernel(kata) == str(vmlinux)
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "elf1", "uname", "-r")
        assert res.returncode == 0, explain(res)
        assert res.stdout.strip() == kata.guest_release


def test_the_bzimage_still_boots(kata: Kata) -> None:
    vmlinuz = kataconfig.GUEST_DIR / "vmlinuz"
    require(vmlinuz.is_file(), f"{vmlinuz} (run `make guest`)")
    kata.write_config({kataconfig.HYPERVISOR: {"kernel": str(vmlinuz)}})
    with detached(kata.cd, KATA, "bz1", "sleep", "300"):
        assert qemu_kernel(kata) == str(vmlinuz)
        res = kata.cd.ctr("task", "exec", "--exec-id", "e1", "bz1", "true")
        assert res.returncode == 0, explain(res)


def test_an_elf_kernel_without_a_pvh_entry_is_refused(kata: Kata, tmp_path: Path) -> None:
    not_pvh = tmp_path / "vmlinux-not-pvh"
    shutil.copyfile("/bin/true", not_pvh)  # an ELF executable, no Xen PVH note
    config = kata.write_config({kataconfig.HYPERVISOR: {"kernel": str(not_pvh)}})
    expected = (f"{kataconfig.HYPERVISOR}.kernel: {not_pvh} is an ELF kernel without a PVH "
                "entry note, which QEMU needs; use the kernel's bzImage (vmlinuz)")
    res = run_rm(kata.cd, KATA, "nopvh", "true")
    assert res.returncode != 0, explain(res)
    assert expected in res.stderr and f"(in {config})" in res.stderr, explain(res)
    assert not kata.qemu_processes()
    check = subprocess.run([str(RUNTIME_BIN / "kata-runtime"), "--config", str(config),
                            "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1, check.stdout + check.stderr
    assert any(line.startswith("FAIL") and expected in line
               for line in check.stdout.splitlines()), check.stdout
