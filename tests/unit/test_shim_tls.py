"""shim/tls.py: a shim process runs without ssl and _hashlib until the metrics need ssl."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: What a shim process does: it is run as containerd-shim-kata-v2 and imports its package.
PROBE = """
import sys
sys.argv = ["/usr/local/bin/containerd-shim-kata-v2", "-v"]
from shim.main import main
import shim.daemon
import asyncio, hashlib
print("ssl", sys.modules.get("ssl"), "_hashlib", sys.modules.get("_hashlib"))
print("sha256", hashlib.sha256(b"kata").hexdigest())
async def answer():
    await asyncio.sleep(0)
    return 42
print("loop", asyncio.run(answer()))
from shim import tls
tls.allow()
import prometheus_client.exposition
print("after allow", sys.modules["ssl"].__name__)
"""


def _run(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_shim_process_leaves_out_tls_until_the_metrics_need_it() -> None:
    lines = _run(PROBE)
    assert "ssl None _hashlib None" in lines, lines
    assert f"sha256 {hashlib.sha256(b'kata').hexdigest()}" in lines, lines
    assert "loop 42" in lines, lines
    assert "after allow ssl" in lines, lines


def test_another_program_importing_the_shim_keeps_its_tls_modules() -> None:
    lines = _run("import shim.main, shim.daemon, sys\n"
                 "print(type(sys.modules.get('ssl')).__name__)")
    assert lines == ["module"], lines


def test_which_processes_are_shims() -> None:
    from shim.tls import is_shim_process

    for argv0 in ("containerd-shim-kata-v2", "/usr/local/bin/containerd-shim-kata-qemu-v2",
                  "/opt/x/bin/containerd-shim-kata-stratovirt-v2", "/repo/shim/__main__.py"):
        assert is_shim_process(argv0), argv0
    for argv0 in ("", "pytest", "/usr/bin/kata-runtime", "/usr/bin/containerd-shim-runc-v2",
                  "/repo/cli/__main__.py"):
        assert not is_shim_process(argv0), argv0
