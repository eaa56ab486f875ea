"""The installed `kata-runtime check` on this host, with the guest from `make guest`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require, require_root
from tests.harness import kataconfig
from tests.harness.containerd import RUNTIME_BIN

pytestmark = pytest.mark.e2e

KATA_RUNTIME = RUNTIME_BIN / "kata-runtime"


def test_check_passes_with_the_built_guest(tmp_path: Path) -> None:
    require_root()
    require(KATA_RUNTIME.is_file(), f"{KATA_RUNTIME} (run `make venv`)")
    for path in (kataconfig.guest_kernel(), kataconfig.GUEST_DIR / "initrd.img"):
        require(path.is_file(), f"{path} (run `make guest`)")
    config = kataconfig.write(tmp_path / "configuration.toml",
                              kataconfig.overrides_for_tests(tmp_path / "state"))
    done = subprocess.run([str(KATA_RUNTIME), "--config", str(config), "check"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok    configuration: {config}" in done.stdout
    assert f"guest kernel (kernel): {kataconfig.guest_kernel()} present" in done.stdout
    assert re.search(r"^ok    accelerator: (tcg|kvm) \((tcg|kvm): \S.*\)$", done.stdout, re.M), \
        done.stdout
