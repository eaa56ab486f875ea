"""End-to-end fixtures: a private containerd per test, with busybox imported, and a leak
check after every test.

    containerd  -> Containerd   (stock runtimes only; proves the harness)
    kata        -> Kata         (containerd whose shims see KATA_CONF_FILE = a test config:
                                 guest from build/out, state_dir under the private dir)
    cri         -> (Kata, Kubelet)  (the same with containerd's CRI plugin, handler `kata`,
                                 and a Python kubelet stand-in)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import failed, require, require_root, require_tools
from tests.harness import kataconfig, leaks
from tests.harness.containerd import RUNTIME_BIN, Containerd, reap_stale
from tests.harness.cri.client import Kubelet
from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata, kata_containerd, kata_cri_containerd
from tests.harness.kata import guest_release as kata_guest_release

HOST_TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "umount")
QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
KATA_SHIM = RUNTIME_BIN / "containerd-shim-kata-v2"
GUEST_FILES = ("vmlinux", "vmlinuz", "initrd.img", "kernel-release")
LEAK_TIMEOUT = 30.0


#: Modules about QEMU itself (its argv, QMP, bootguest, microvm): skipped when the suite
#: runs on another hypervisor (``make test-stratovirt``).
QEMU_ONLY = frozenset({"test_qemu_vm.py", "test_guest_boot.py", "test_guest_handover.py",
                       "test_microvm.py",
                       "test_qemu_levers.py",
                       "test_bench_machines.py", "test_bench_suite.py",
                       "test_bench_network.py", "test_install.py",
                       "test_agent_vsock.py", "test_bench_agent_channel.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    qemu_only = pytest.mark.skip(reason=f"QEMU-specific; this run is on {kataconfig.HYPERVISOR}")
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
            if not kataconfig.is_qemu() and Path(str(item.path)).name in QEMU_ONLY:
                item.add_marker(qemu_only)


@pytest.fixture(scope="session")
def host_ready() -> None:
    require_root()
    require_tools(*HOST_TOOLS)
    for directory in reap_stale():
        print(f"reaped a private containerd left by a dead test run: {directory}")


@pytest.fixture(scope="session")
def guest_release(host_ready: None) -> str:
    """Checks every kata prerequisite; returns the guest kernel's release."""
    require_tools(QEMU, VIRTIOFSD)
    missing = [f for f in GUEST_FILES if not (kataconfig.GUEST_DIR / f).is_file()]
    require(not missing, f"{', '.join(missing)} in {kataconfig.GUEST_DIR} (run `make guest`)")
    require(os.access(KATA_SHIM, os.X_OK), f"{KATA_SHIM} (run `make venv`: pip install -e .)")
    return kata_guest_release()


def diagnostics(cd: Containerd, state_dir: Path | None = None) -> str:
    parts = [f"--- containerd log ({cd.log_path}), tail ---", cd.log_tail(80)]
    for log in sorted(state_dir.glob("sbs/*/console.log")) if state_dir else []:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        parts += [f"--- {log}, tail ---", tail]
    return "\n".join(parts)


@contextlib.contextmanager
def leak_checked(cd: Containerd, request: pytest.FixtureRequest,
                 kata_state_dir: Path) -> Iterator[None]:
    """After the test: nothing may be left (a failed test is reset first, then checked)."""
    before = leaks.snapshot(cd, kata_state_dir=str(kata_state_dir))
    yield
    if failed(request):
        print(diagnostics(cd, kata_state_dir))
        with contextlib.suppress(Exception):
            cd.reset()
    try:
        leaks.assert_no_leaks(before, timeout=LEAK_TIMEOUT)
    except AssertionError:
        if not failed(request):  # the shim's log says why its teardown did not finish
            print(diagnostics(cd, kata_state_dir))
        raise
    finally:
        with contextlib.suppress(Exception):
            cd.reset()


@pytest.fixture
def containerd(host_ready: None, busybox_image: Path,
               request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """A private containerd with docker.io/library/busybox:latest; leak-checked."""
    with Containerd() as cd:
        cd.import_image(busybox_image, IMAGE_REF)
        with leak_checked(cd, request, cd.dir / "kata-state"):
            yield cd


@pytest.fixture
def kata(guest_release: str, busybox_image: Path,
         request: pytest.FixtureRequest) -> Iterator[Kata]:
    """A private containerd whose kata shims use a test configuration; leak-checked."""
    with kata_containerd(busybox_image) as env, leak_checked(env.cd, request, env.state_dir):
        yield env


@pytest.fixture
def cri(guest_release: str, request: pytest.FixtureRequest) -> Iterator[tuple[Kata, Kubelet]]:
    """A private containerd with its CRI plugin and our handler, and a kubelet stand-in
    on it; leak-checked, every pod removed afterwards."""
    with kata_cri_containerd() as kata, leak_checked(kata.cd, request, kata.state_dir):
        kubelet = Kubelet(kata.cd.address, kata.cd.dir / "pod-logs")
        try:
            yield kata, kubelet
        finally:
            with contextlib.suppress(Exception):
                kubelet.remove_all()
            kubelet.close()


@pytest.fixture
def bench_leak_checked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                       ) -> Iterator[Callable[[ModuleType, str], None]]:
    """For a benchmark that starts its own containerd: ``patch(module, "kata_containerd")``
    wraps that factory in `module` with the `kata` fixture's leak check, run as soon as the
    benchmark is done with its containerd (the harness's close() kills whatever is left,
    which would hide a leak). The test errors if the benchmark never used the factory."""
    used: list[str] = []

    def patch(module: ModuleType, factory: str) -> None:
        make = getattr(module, factory)

        @contextlib.contextmanager
        def checked(*args: Any, **kwargs: Any) -> Iterator[Kata]:
            used.append(factory)
            with make(*args, **kwargs) as env, leak_checked(env.cd, request, env.state_dir):
                yield env

        monkeypatch.setattr(module, factory, checked)

    yield patch
    assert used, "the benchmark never started a containerd through the patched factory"
