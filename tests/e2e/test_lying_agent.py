"""Kata e2e: a guest whose agent lies, through the real VM, virtio-serial and shim.

The guest kernel command line carries ``KATA_AGENT_HOSTILE=<mode>:ListProcesses`` (see
agent/hostile.py): the agent serves honestly until `ctr task ps` asks for the container's
processes, then breaks the protocol. The host must give a clear error in bounded time,
keep its memory bounded, end the pod where the channel cannot be trusted any more, and
leave nothing behind (the kata fixture checks that after each test).
"""

from __future__ import annotations

import time
import tomllib

import pytest

from benchmarks.soak import rss_kib
from tests.harness import kataconfig
from tests.harness.kata import Kata
from tests.harness.scenarios import KATA, remove, run_detached, wait_task_status

TRIGGER = "ListProcesses"  # `ctr task ps`; its deadline is 10 s (agent_client TIMEOUTS)


def lying(kata: Kata, mode: str) -> None:
    base = tomllib.loads(kataconfig.DEFAULT_CONFIG.read_text())["hypervisor"]["qemu"]
    params = f"{base['kernel_params']} KATA_AGENT_HOSTILE={mode}:{TRIGGER}"
    kata.write_config({kataconfig.HYPERVISOR: {"kernel_params": params}})
    run_detached(kata.cd, KATA, "liar", "sleep", "300")


def ps(kata: Kata) -> tuple[int, str, float]:
    started = time.monotonic()
    res = kata.cd.ctr("task", "ps", "liar", timeout=90)
    return res.returncode, res.stdout + res.stderr, time.monotonic() - started


@pytest.mark.parametrize(("mode", "error"), [
    ("oversized", "exceeds"), ("stray", "deadline"),
])
def test_a_lie_on_an_intact_stream_fails_the_call_and_the_pod_goes_on(
        kata: Kata, mode: str, error: str) -> None:
    lying(kata, mode)
    code, out, took = ps(kata)
    assert code != 0 and error in out.lower(), out
    assert took < 40, f"the lie took {took:.1f}s to be reported"
    code, out, _ = ps(kata)  # the agent is honest again and the stream intact
    assert code == 0 and "PID" in out, explain_ps(out)
    assert kata.cd.tasks().get("liar") == "RUNNING"
    remove(kata.cd, "liar")


@pytest.mark.parametrize("mode", ["garbage", "flood", "silent"])
def test_a_broken_channel_ends_the_pod_and_bounds_the_shim(kata: Kata, mode: str) -> None:
    lying(kata, mode)
    shim = kata.shim_daemons()[0].pid
    before = rss_kib(shim)
    code, out, took = ps(kata)
    assert code != 0, out
    assert took < 40, f"the broken channel took {took:.1f}s to be reported"
    # The channel cannot be trusted any more: the sandbox ends, containerd sees the exit.
    assert wait_task_status(kata.cd, "liar", ["STOPPED", ""], timeout=60) in ("STOPPED", ""), \
        f"the task still runs on a broken channel: {kata.cd.tasks()}"
    after = rss_kib(shim) if kata.shim_daemons() else before
    assert after < before + 16 * 1024, f"shim RSS {before} -> {after} KiB"
    remove(kata.cd, "liar")


def explain_ps(out: str) -> str:
    return f"`ctr task ps` after the lie: {out}"

