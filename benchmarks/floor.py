"""The boot floor: QEMU with our kernel and initrd, from spawn until the guest runs /init.

Boots the kernel, initrd, kernel parameters, machine and memory of a configuration file
with `build/bootguest.py`'s `Guest` (the runtime's own QEMU command line, without the
shared filesystem, NIC or agent: nothing a pod adds), and times on the host the console
line /init prints first (``kata-init:``). A runtime cannot start a container faster than
this on the same machine, so `make bench` reports the cold start against it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

from tests.harness.kataconfig import REPO

TIMEOUT = 120.0


def _bootguest() -> ModuleType:
    if "bootguest" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bootguest",
                                                      REPO / "build" / "bootguest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bootguest"] = module
        spec.loader.exec_module(module)
    return sys.modules["bootguest"]


def seconds_to_init(config_path: Path) -> float:
    """Host seconds from QEMU's spawn to the guest's /init, for this configuration."""
    bg = _bootguest()
    qemu = tomllib.loads(config_path.read_text())["hypervisor"]["qemu"]
    params = qemu.get("kernel_params", "")
    with bg.Guest(Path(qemu["kernel"]), Path(qemu["initrd"]), params,
                  memory_mib=int(qemu.get("default_memory", 2048)),
                  machine_type=qemu.get("machine_type", "q35")) as guest:
        seen = guest.wait_for(re.escape(bg.INIT_MARKER), TIMEOUT)
        if seen is None:
            raise RuntimeError(f"the guest did not reach /init in {TIMEOUT}s:\n"
                               f"{guest.console()}")
        return float(seen[0])
