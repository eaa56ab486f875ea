"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Generator
from pathlib import Path
from types import FrameType

import pytest

from tests.harness import images

REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI timeout) -> KeyboardInterrupt, so fixtures still tear down and stop
    # their containerd, shims and VMs; containerd.reap_stale() handles harder deaths.
    signal.signal(signal.SIGTERM, _terminate)
    config.addinivalue_line(
        "markers", "e2e: end-to-end test against real containerd, QEMU, guest kernel and agent")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                     pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell whether a test failed."""
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    """True unless the test ran to completion and passed (an interrupted test has no
    `call` report)."""
    reports = request.node.stash.get(REPORTS, {})
    return "call" not in reports or any(r.failed for r in reports.values())


def require(condition: bool, what: str) -> None:
    """A missing prerequisite fails the test (it must not pass silently as a skip)."""
    if not condition:
        pytest.fail(f"prerequisite missing: {what}", pytrace=False)


def require_root() -> None:
    require(os.geteuid() == 0, "these tests need root (containerd, mounts, QEMU)")


def require_tools(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None or Path(name).exists(),
                f"`{name}` not found (run `make deps`, i.e. build/host-deps.sh)")


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    """Path of the busybox OCI archive (built once, cached by content hash)."""
    require(images.BUSYBOX.exists(), f"{images.BUSYBOX} (apt-get install busybox-static)")
    return images.busybox_image_tar()
