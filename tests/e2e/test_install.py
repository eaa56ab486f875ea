"""`make install` (build/install.sh) under DESTDIR: what it puts where (the frozen runtime of
`make runtime` under /usr/libexec/kata-py, entry points linked to it), that the installed
entry points and configuration work together without the checkout, and that --uninstall
removes exactly that."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sandbox.config import load_config
from tests.conftest import require
from tests.harness import kataconfig

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
BUNDLE = REPO / "build/out/runtime/kata-py"  # make runtime
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


VARIANT_SHIMS = ("containerd-shim-kata-qemu-v2", "containerd-shim-kata-qemu-microvm-v2",
                 "containerd-shim-kata-stratovirt-v2")


def install(dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "build" / "install.sh"), *args], capture_output=True,
                          text=True, env={**os.environ, "DESTDIR": str(dest)}, timeout=60)


def test_install_then_uninstall(tmp_path: Path) -> None:
    require((BUNDLE / "kata-py").is_file(), f"{BUNDLE} (run `make runtime`)")
    dest = tmp_path / "root"
    res = install(dest, str(BUNDLE), str(kataconfig.GUEST_DIR))
    assert res.returncode == 0, res.stderr
    share = dest / "usr/share/kata-containers"
    kernel, initrd = share / "vmlinux.container", share / "kata-containers-initrd.img"
    assert kernel.read_bytes() == (kataconfig.GUEST_DIR / "vmlinux").read_bytes()
    bzimage = share / "vmlinuz.container"  # StratoVirt's
    assert bzimage.read_bytes() == (kataconfig.GUEST_DIR / "vmlinuz").read_bytes()
    assert initrd.stat().st_size == (kataconfig.GUEST_DIR / "initrd.img").stat().st_size
    config_path = dest / "usr/share/defaults/kata-containers/configuration.toml"
    config = load_config(str(config_path))
    # The installed configuration names the installed guest (relative to DESTDIR here).
    settings = config.hypervisor.settings()
    assert Path(settings["kernel"]) == Path("/") / kernel.relative_to(dest)
    # It boots the shared root image through its loader; the whole initrd stays for the
    # configurations (microvm) without PCI.
    image, loader = share / "kata-containers.img", share / "kata-containers-image-loader.img"
    assert image.read_bytes() == (kataconfig.GUEST_DIR / "rootfs.img").read_bytes()
    assert loader.read_bytes() == (kataconfig.GUEST_DIR / "rootfs-loader.img").read_bytes()
    assert Path(settings["image"]) == Path("/") / image.relative_to(dest)
    assert Path(settings["initrd"]) == Path("/") / loader.relative_to(dest)
    program = dest / "usr/libexec/kata-py/kata-py"
    assert program.is_file() and (program.parent / "_internal").is_dir()
    assert not (program.parent / "bin").exists()  # the build tree's links stay there
    for name in ("containerd-shim-kata-v2", "kata-runtime", *VARIANT_SHIMS):
        link = dest / "usr/local/bin" / name
        # relative: the same links work below DESTDIR and once installed at /
        assert link.is_symlink() and os.readlink(link) == "../../libexec/kata-py/kata-py"
        assert link.resolve() == program
    links = [p for p in dest.rglob("*") if p.is_symlink()]
    assert [str(p) for p in links if str(REPO) in str(p.resolve())] == []
    # Each runtime variant's configuration is installed and loads; the qemu variant's is the
    # default configuration.
    conf_dir = config_path.parent
    machines = {v: load_config(str(conf_dir / f"configuration-{v}.toml")).hypervisor
                for v in ("qemu", "qemu-microvm", "stratovirt")}
    assert machines["qemu"] == config.hypervisor
    assert machines["qemu-microvm"].settings()["machine_type"] == "microvm"
    assert machines["stratovirt"].name == "stratovirt"

    # The installed CLI accepts the installed configuration (guest paths moved under DESTDIR).
    moved = tmp_path / "moved.toml"
    guest = {"kernel": str(kernel), "initrd": str(loader), "image": str(image)}
    kataconfig.write(moved, {"hypervisor.qemu": guest}, base=config_path)
    # No venv on PATH: the installed program carries its own Python.
    env = {"PATH": SYSTEM_PATH}
    check = subprocess.run([str(dest / "usr/local/bin/kata-runtime"), "--config", str(moved),
                            "check"], capture_output=True, text=True, timeout=60, env=env)
    fails = [line for line in check.stdout.splitlines() if line.startswith("FAIL")]
    if "ok    accelerator: tcg" in check.stdout:
        # The shipped configuration refuses pods under TCG, and says how to allow them.
        assert check.returncode == 1 and len(fails) == 1, check.stdout
        assert fails[0].startswith("FAIL  security boundary:") and "allow_tcg" in fails[0]
        kataconfig.write(moved, {"hypervisor.qemu": {**guest, "allow_tcg": True}},
                         base=config_path)
        check = subprocess.run([str(dest / "usr/local/bin/kata-runtime"), "--config",
                                str(moved), "check"], capture_output=True, text=True, timeout=60,
                               env=env)
    assert check.returncode == 0, check.stdout + check.stderr

    res = install(dest, "--uninstall")
    assert res.returncode == 0, res.stderr
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir())
    assert left == [], f"left after --uninstall: {left}"


def test_install_refuses_a_missing_guest(tmp_path: Path) -> None:
    res = install(tmp_path / "root", str(BUNDLE), str(tmp_path / "no-guest"))
    assert res.returncode != 0
    assert "make guest" in res.stderr, res.stderr
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*.img"))


def test_install_refuses_what_is_not_the_frozen_runtime(tmp_path: Path) -> None:
    res = install(tmp_path / "root", str(VENV), str(kataconfig.GUEST_DIR))
    assert res.returncode != 0
    assert "make runtime" in res.stderr, res.stderr
    assert not (tmp_path / "root").exists()
