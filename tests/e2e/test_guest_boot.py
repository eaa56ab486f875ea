"""Boot the real guest image (build/out, `make guest`) under QEMU.

TCG unless KATA_TEST_ACCEL=kvm (KVM does not run a stock guest kernel on these machines, see
docs). These tests fail, not skip, when QEMU, virtiofsd or the artifacts are missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = Path(os.environ.get("KATA_GUEST_DIR", ROOT / "build" / "out"))
ACCEL = os.environ.get("KATA_TEST_ACCEL", "tcg")
BOOT_TIMEOUT = 120.0  # TCG on a busy 2-core machine


def _load_bootguest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bootguest", ROOT / "build" / "bootguest.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bootguest"] = mod
    spec.loader.exec_module(mod)
    return mod


bg = _load_bootguest()


@pytest.fixture(scope="module")
def image() -> tuple[Path, Path]:
    missing = [p for p in (bg.QEMU, bg.VIRTIOFSD) if not Path(p).exists()]
    if missing:
        pytest.fail(f"{missing} not found: install qemu-system-x86 (make deps)")
    kernel, initrd = GUEST_DIR / "vmlinux", GUEST_DIR / "initrd.img"
    for p in (kernel, initrd):
        if not p.exists():
            pytest.fail(f"{p} missing: build the guest first (make guest)")
    if os.geteuid() != 0:
        pytest.fail("the guest boot tests need root (virtiofsd)")
    return kernel, initrd


def _leftovers(token: str) -> list[str]:
    """Processes whose command line mentions ``token`` (a Guest's private temp dir)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in cmd:
            found.append(f"{d.name}: {cmd}")
    return found


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "hello.txt").write_text("hello from the host\n")
    return d


@pytest.fixture
def guests() -> Iterator[list[object]]:
    """Collects the Guests a test starts; closes them and checks nothing is left behind."""
    started: list[object] = []
    yield started
    for g in started:
        g.close()  # type: ignore[attr-defined]
        left = _leftovers(str(g.tmp))  # type: ignore[attr-defined]
        assert not left, f"processes left behind: {left}"


def test_guest_runs_init_and_agent_then_qemu_dies_on_kill(
    image: tuple[Path, Path], guests: list[object]
) -> None:
    kernel, initrd = image
    g = bg.Guest(kernel, initrd, f"{bg.DEFAULT_PARAMS} rdinit=/init", accel=ACCEL)
    guests.append(g)
    hit = g.wait_for(r"kata-init: exec /opt/kata-agent/kata-agent", BOOT_TIMEOUT)
    assert hit is not None, f"the kernel did not run /init:\n{g.console()}"
    # The agent is PID 1 now: if it dies the kernel panics and QEMU (-no-reboot) exits.
    # It waits for the host on agent.channel.0, so a healthy one is still there later.
    panic = g.wait_for(r"Kernel panic|Attempted to kill init", 15.0, since=g.last_match)
    assert panic is None, f"the agent died (PID 1 exited):\n{g.console()}"
    assert g.proc.poll() is None, f"QEMU exited:\n{g.console()}"
    assert g.agent_sock.exists(), "QEMU did not create the agent.channel.0 socket"
    t0 = time.monotonic()
    g.close()
    assert g.proc.returncode is not None
    assert time.monotonic() - t0 < 10, "QEMU took too long to die"
    assert not _leftovers(str(g.tmp))


def test_qemu_and_virtiofsd_die_with_a_killed_bootguest(
    image: tuple[Path, Path], share: Path
) -> None:
    """`build/bootguest.py` killed with SIGKILL takes QEMU and virtiofsd along (they run
    behind the parent-death wrapper); only its temp dir stays, which nothing uses."""
    tool = subprocess.Popen([sys.executable, str(ROOT / "build" / "bootguest.py"),
                             "--virtiofs", str(share), "--until", "kata-agent: serving",
                             "--timeout", str(BOOT_TIMEOUT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = f"sandbox-bootguest-{tool.pid}"
    tmp_dirs: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not tmp_dirs and time.monotonic() < deadline:
            for line in _leftovers(name):
                if "qemu-system" in line:
                    tmp_dirs = re.findall(r"/tmp/kata-bootguest-[^/ ]+", line)
            time.sleep(0.1)
        assert tmp_dirs, f"no QEMU named {name} appeared"
        assert any("virtiofsd" in p for p in _leftovers(tmp_dirs[0])), "no virtiofsd"
    finally:
        tool.kill()
        tool.wait()
    deadline = time.monotonic() + 10
    while _leftovers(tmp_dirs[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _leftovers(tmp_dirs[0]), _leftovers(tmp_dirs[0])
    shutil.rmtree(tmp_dirs[0], ignore_errors=True)


# Run as init by the kernel instead of /init: loads every module of modules.list the way
# the agent does (in order, one by one), then checks the devices and filesystems.
# The kernel passes the words after "--" to init; the quoted script is one of them. No '='
# in it (the kernel would take it for a parameter).
CHECK_SCRIPT = (
    "mount -t proc p /proc; mount -t sysfs s /sys; mount -t devtmpfs d /dev; "
    "for m in $(cat /etc/kata-agent/modules.list); do insmod $m || echo MODFAIL $m; done; "
    "echo PORT $(cat /sys/class/virtio-ports/*/name); "
    "mkdir -p /run/s; mount -t virtiofs kataShared /run/s && cat /run/s/hello.txt; "
    "mount -t tmpfs t /tmp; mkdir /tmp/l /tmp/u /tmp/w /tmp/m; "
    "mount -t overlay o -olowerdir/tmp/l,upperdir/tmp/u,workdir/tmp/w /tmp/m "
    "&& echo OVERLAY ok; "
    "crun --version; echo GUEST-CHECK-DONE; poweroff -f"
)


def test_modules_load_devices_appear_and_qemu_exits_on_poweroff(
    image: tuple[Path, Path], share: Path, guests: list[object]
) -> None:
    kernel, initrd = image
    # overlay options contain '=': pass them with '/' above and fix them up in the guest
    script = CHECK_SCRIPT.replace(
        "-olowerdir/tmp/l,upperdir/tmp/u,workdir/tmp/w",
        "-o $(echo lowerdirX/tmp/l,upperdirX/tmp/u,workdirX/tmp/w | tr X \\\\075)",
    )
    params = f'{bg.DEFAULT_PARAMS} rdinit=/bin/sh -- -c "{script}"'
    g = bg.Guest(kernel, initrd, params, accel=ACCEL, share_dir=share)
    guests.append(g)
    done = g.wait_for(r"GUEST-CHECK-DONE", BOOT_TIMEOUT)
    console = g.console()
    assert done is not None, f"the check script did not finish:\n{console}"
    assert "MODFAIL" not in console, console
    # (SeaBIOS may leave "Booting from ROM.." unterminated: the line can start with it.)
    assert re.search(r"PORT agent\.channel\.0$", console, re.M), console
    assert "hello from the host" in console, f"virtio-fs share not readable:\n{console}"
    assert "OVERLAY ok" in console, console
    assert re.search(r"crun version \d", console), console
    rc = g.wait_exit(30)
    assert rc is not None, f"QEMU did not exit after the guest powered off:\n{g.console()}"
