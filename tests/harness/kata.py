"""A private containerd set up for containerd-shim-kata-v2 (shared by e2e, demo, bench)."""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.harness import kataconfig, procs
from tests.harness.containerd import RUNTIME_BIN, Containerd
from tests.harness.images import IMAGE_REF, PAUSE_REF, busybox_image_tar, pause_image_tar

CRI_NAMESPACE = "k8s.io"
CRI_HANDLER = "kata"


@dataclass
class Kata:
    """A containerd whose shims see KATA_CONF_FILE=<config_path>, and its sandbox state."""

    cd: Containerd
    config_path: Path
    state_dir: Path
    guest_release: str

    def write_config(self, *overrides: kataconfig.Overrides) -> Path:
        """(Re)write the shim's configuration; the shim reads it at every start."""
        base = kataconfig.overrides_for_tests(self.state_dir)
        return kataconfig.write(self.config_path, base, *overrides)

    def write_variant_config(self, variant: str, base: Path,
                             *overrides: kataconfig.Overrides) -> Path:
        """``configuration-<variant>.toml`` beside the default one, from the shipped `base`
        with the test settings: what the shim named containerd-shim-kata-<variant>-v2
        (runtime io.containerd.kata-<variant>.v2) reads."""
        path = self.config_path.parent / f"configuration-{variant}.toml"
        return kataconfig.write(path, kataconfig.overrides_for_tests(self.state_dir, base=base),
                                *overrides, base=base)

    def sandbox_dirs(self) -> list[Path]:
        """Every sandbox's state dir (``sbs/<namespace>/<id>``)."""
        sbs = self.state_dir / "sbs"
        return sorted(p for ns in sbs.iterdir() for p in ns.iterdir()) if sbs.is_dir() else []

    def qemu_processes(self) -> list[procs.Proc]:
        """The VMM processes (QEMU or StratoVirt) of this containerd's sandboxes."""
        return procs.matching(["qemu-system", "stratovirt"], scope=[str(self.cd.dir)])

    def shim_daemons(self) -> list[procs.Proc]:
        """Long-running kata shims of this containerd (not `start`/`delete` invocations)."""
        return [p for p in self.cd.shim_processes()
                if "containerd-shim-kata" in p.cmdline and p.argv[-1] not in
                ("start", "delete")]


def guest_release(guest_dir: Path = kataconfig.GUEST_DIR) -> str:
    return (guest_dir / "kernel-release").read_text().strip()


@contextlib.contextmanager
def kata_containerd(image_tar: Path | None = None) -> Iterator[Kata]:
    """Start a private containerd for the kata shim, with busybox imported; clean up."""
    cd = Containerd()
    with contextlib.closing(cd):
        env = Kata(cd, cd.dir / "configuration.toml", cd.dir / "kata-state", guest_release())
        env.write_config()
        cd.extra_env["KATA_CONF_FILE"] = str(env.config_path)
        cd.start()
        cd.import_image(image_tar or busybox_image_tar(), IMAGE_REF)
        yield env


def accelerator(argv: tuple[str, ...]) -> str | None:
    """The accelerator a QEMU command line asks for (-accel X, -machine ...,accel=X)."""
    text = " ".join(argv)
    m = re.search(r"-accel\s+([a-z]+)|accel=([a-z]+)|-enable-kvm", text)
    if not m:
        return None
    return m.group(1) or m.group(2) or "kvm"


def add_cri_handler(kata_config: Path, containerd_config: Path,
                    handler: str = CRI_HANDLER) -> None:
    """Add our CRI runtime handler exactly as an operator does (the shipped command)."""
    subprocess.run([str(RUNTIME_BIN / "kata-runtime"), "containerd-config", "add",
                    "--file", str(containerd_config), "--handler", handler,
                    "--kata-config", str(kata_config)],
                   check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def kata_cri_containerd(image_tar: Path | None = None,
                        variants: Mapping[str, Path] | None = None) -> Iterator[Kata]:
    """A private containerd with its CRI plugin and our handler `kata` (whose options carry
    the test configuration's path), busybox and the pause image imported into k8s.io.
    `variants` ({"qemu-microvm": shipped base file}) adds a handler ``kata-<variant>`` each,
    on its own test configuration."""
    cd = Containerd(namespace=CRI_NAMESPACE, enable_cri=True)
    with contextlib.closing(cd):
        env = Kata(cd, cd.dir / "configuration.toml", cd.dir / "kata-state", guest_release())
        env.write_config()
        cd.sandbox_image = PAUSE_REF
        cd.config_hooks.append(functools.partial(add_cri_handler, env.config_path))
        for variant, base in (variants or {}).items():
            config = env.write_variant_config(variant, base)
            cd.config_hooks.append(functools.partial(add_cri_handler, config,
                                                     handler=f"kata-{variant}"))
        cd.start()
        cd.import_image(image_tar or busybox_image_tar(), IMAGE_REF)
        cd.import_image(pause_image_tar(), PAUSE_REF)
        yield env
