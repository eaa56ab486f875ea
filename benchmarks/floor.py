"""The boot floor: QEMU with our kernel and initrd, from spawn until the guest runs /init.

Boots the kernel, initrd, kernel parameters, machine and memory of a configuration file
with `build/bootguest.py`'s `Guest` (the runtime's own QEMU command line, without the
shared filesystem, NIC or agent: nothing a pod adds), and times on the host the console
line /init prints first (``kata-init:``). A runtime cannot start a container faster than
this on the same machine, so `make bench` reports the cold start against it. With the
shared root image (``image``) the initrd is its loader, and ``kata-init:`` is printed by
the image's /init once the loader has mounted it: the floor includes the mount.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.harness.kataconfig import REPO

TIMEOUT = 120.0
OUT = REPO / "build" / "out"


def _bootguest() -> ModuleType:
    if "bootguest" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bootguest",
                                                      REPO / "build" / "bootguest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bootguest"] = module
        spec.loader.exec_module(module)
    return sys.modules["bootguest"]


@dataclass(frozen=True)
class GuestImage:
    """What a bench guest boots: a configuration's ``[hypervisor.qemu]`` kernel, initrd,
    parameters, memory and machine (defaults: build/out's, bootguest's parameters)."""

    kernel: Path = OUT / "vmlinux"
    initrd: Path = OUT / "initrd.img"
    params: str = ""  # "" = bootguest's DEFAULT_PARAMS
    memory_mib: int = 2048
    machine_type: str = "q35"
    #: The shared root image (then ``initrd`` is its loader); None: the whole initrd.
    image: Path | None = None

    @classmethod
    def from_config(cls, path: Path) -> GuestImage:
        qemu = tomllib.loads(path.read_text())["hypervisor"]["qemu"]
        return cls(Path(qemu["kernel"]), Path(qemu["initrd"]), qemu.get("kernel_params", ""),
                   int(qemu.get("default_memory", 2048)), qemu.get("machine_type", "q35"),
                   Path(qemu["image"]) if qemu.get("image") else None)

    def guest(self, share: Path | None = None, extra: Sequence[str] = ()) -> Any:
        """A started `bootguest.Guest` of this image."""
        bg = _bootguest()
        return bg.Guest(self.kernel, self.initrd, self.params or bg.DEFAULT_PARAMS,
                        memory_mib=self.memory_mib, machine_type=self.machine_type,
                        share_dir=share, extra_args=list(extra), image=self.image)


def seconds_to_init(config_path: Path) -> float:
    """Host seconds from QEMU's spawn to the guest's /init, for this configuration."""
    bg = _bootguest()
    with GuestImage.from_config(config_path).guest() as guest:
        seen = guest.wait_for(re.escape(bg.INIT_MARKER), TIMEOUT)
        if seen is None:
            raise RuntimeError(f"the guest did not reach /init in {TIMEOUT}s:\n"
                               f"{guest.console()}")
        return float(seen[0])
