"""Kata e2e: what the configuration asks and this version ignores is said, at start-up, in
containerd's log (key, file and line); ``[runtime] enable_debug`` turns debug lines on."""

from __future__ import annotations

import re

from tests.harness import kataconfig
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, explain, run_rm


def line_of(text: str, key: str) -> int:
    """The 1-based line where ``key =`` is written."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(f"{key} ="))


def test_unknown_and_unsupported_keys_are_logged_with_file_and_line(kata: Kata) -> None:
    path = kata.write_config({kataconfig.HYPERVISOR: {"defualt_vcpus": 2},
                              "agent.kata": {"kernel_modules": ["nbd"]}})
    text = path.read_text()
    res = run_rm(kata.cd, KATA, "t1", "true")
    assert res.returncode == 0, explain(res)
    log = kata.cd.log_path.read_text(errors="replace")
    unknown = (f"unknown key {kataconfig.HYPERVISOR}.defualt_vcpus in {path}:"
               f"{line_of(text, 'defualt_vcpus')}: ignored")
    unsupported = (f"agent.kata.kernel_modules in {path}:"
                   f"{line_of(text, 'kernel_modules')} is set but not supported")
    ours = [line for line in log.splitlines() if "sandbox=t1" in line]
    assert any(unknown in line and "level=warning" in line for line in ours), unknown
    assert any(unsupported in line for line in ours), unsupported
    # The test configuration sets enable_debug: the daemon's debug lines reach the log.
    assert any(re.search(r"level=debug .*sandbox=t1", line) for line in ours)
