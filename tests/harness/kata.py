"""A private containerd set up for containerd-shim-kata-v2 (shared by e2e, demo, bench)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.harness import kataconfig, procs
from tests.harness.containerd import Containerd
from tests.harness.images import IMAGE_REF, busybox_image_tar


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

    def sandbox_dirs(self) -> list[Path]:
        """Every sandbox's state dir (``sbs/<namespace>/<id>``)."""
        sbs = self.state_dir / "sbs"
        return sorted(p for ns in sbs.iterdir() for p in ns.iterdir()) if sbs.is_dir() else []

    def qemu_processes(self) -> list[procs.Proc]:
        return procs.matching(["qemu-system"], scope=[str(self.cd.dir)])

    def shim_daemons(self) -> list[procs.Proc]:
        """Long-running kata shims of this containerd (not `start`/`delete` invocations)."""
        return [p for p in self.cd.shim_processes()
                if "containerd-shim-kata-v2" in p.cmdline and p.argv[-1] not in
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
