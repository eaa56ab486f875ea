# ruff: noqa: E501  (log lines as the shim and containerd write them)
"""benchmarks.phases: the cold run's breakdown from containerd's log (lines as logged)."""

from __future__ import annotations

import pytest

from benchmarks.phases import PHASES, breakdown, shim_events, timestamp

SID = "probe1"
LOG = """\
time="2026-12-03T09:07:36.306270540Z" level=debug msg="garbage collected" d="818.739µs"
time=2026-12-03T09:07:36.786167Z level=info msg="shim daemon serving" sandbox=probe1 namespace=ns pid=19980
time=2026-12-03T09:07:36.800000Z level=info msg="shim daemon serving" sandbox=probe10 namespace=ns pid=1
time=2026-12-03T09:07:36.987519Z level=info msg="vm started sandbox=probe1 hypervisor=qemu vmm_pid=20003 accelerator=tcg reason='tcg: no vmx'" sandbox=probe1 namespace=ns logger=sandbox.sandbox
time=2026-12-03T09:07:46.184387Z level=info msg="agent ready: started in 4.68s, serving at guest uptime 7.81s, 9.36s after the sandbox start began" sandbox=probe1 namespace=ns logger=sandbox.sandbox
time=2026-12-03T09:07:46.323786Z level=info msg="sandbox started" sandbox=probe1 namespace=ns hypervisor=qemu accelerator=tcg boot_seconds=9.50
time=2026-12-03T09:07:47.054008Z level=info msg="container created" sandbox=probe1 namespace=ns container=probe1
time="2026-12-03T09:07:47.054883570Z" level=debug msg="event forwarded" ns=ns topic=/tasks/create
time=2026-12-03T09:07:47.489244Z level=info msg="process started" sandbox=probe1 namespace=ns container=probe1 exec="" guest_pid=85
time=2026-12-03T09:07:47.951292Z level=info msg="process exited" sandbox=probe1 namespace=ns container=probe1 exec="" exit_status=0
time=2026-12-03T09:07:48.100000Z level=info msg="process exited" sandbox=probe1 namespace=ns container=probe1 exec="e1" exit_status=0
""".splitlines()


def test_timestamps_of_both_log_formats_agree() -> None:
    assert timestamp("2026-12-03T09:07:47.054883570") - timestamp("2026-12-03T09:07:47") \
        == pytest.approx(0.054883570, abs=1e-6)
    assert timestamp("2026-12-03T09:07:47.054008") < timestamp("2026-12-03T09:07:47.054883570")


def test_events_are_the_first_of_each_for_that_sandbox_only() -> None:
    events = shim_events(LOG, SID)
    assert events["shim daemon serving"][0] == timestamp("2026-12-03T09:07:36.786167")
    assert events["process exited"][0] == timestamp("2026-12-03T09:07:47.951292")
    assert len(events) == 7


def test_breakdown_adds_up_to_the_wall_time() -> None:
    started = timestamp("2026-12-03T09:07:36.300000")
    ended = timestamp("2026-12-03T09:07:48.700000")
    phases = breakdown(started, ended, shim_events(LOG, SID))
    assert list(phases) == list(PHASES)
    assert sum(phases.values()) == pytest.approx(ended - started)
    assert phases["shim start"] == pytest.approx(0.486167)
    assert phases["kernel to /init"] == pytest.approx(7.81 - 4.68)
    assert phases["agent start"] == pytest.approx(4.68)
    assert phases["firmware"] == pytest.approx((46.184387 - 36.987519) - 7.81)
    assert phases["teardown"] == pytest.approx(48.7 - 47.951292)


def test_a_missing_event_gives_no_breakdown_rather_than_a_wrong_one() -> None:
    lines = [line for line in LOG if "container created" not in line]
    assert breakdown(0.0, 1e10, shim_events(lines, SID)) == {}
    assert breakdown(0.0, 1e10, shim_events(LOG, "other")) == {}
