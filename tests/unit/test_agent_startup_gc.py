"""The agent starts with the cyclic GC off (agent/__main__.py) and turns it back on, with
the start-up's objects frozen, once it serves (agent.main.end_startup_gc)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

from agent.main import end_startup_gc

REPO = Path(__file__).resolve().parents[2]


def test_serving_turns_the_collector_back_on_with_the_start_up_frozen() -> None:
    gc.disable()
    try:
        end_startup_gc()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_the_entry_point_keeps_the_collector_off_while_it_imports() -> None:
    probe = ("import runpy, sys, gc; sys.argv = ['kata-agent', '--help'];"
             "import agent.main as m; m.main = lambda: print(gc.isenabled()) or 0;"
             "runpy.run_module('agent', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
