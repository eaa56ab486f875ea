"""`kata-runtime check`: can this host run VM-isolated sandboxes, and if not, why not.

Theory of operation: each check is a small function returning one or more `Check` lines
(name, pass/fail, detail, required). The checks reuse what a sandbox start uses, so the
verdict matches what the shim would do: `load_config` (lookup order and parsing),
`QemuConfig.check_files` (host binaries and guest images), `choose_accelerator` (KVM or TCG,
with its reason) and the vhost-vsock test that picks the agent channel. Checks that need a
configuration are skipped when it cannot be loaded (the configuration line says why).
A failing line's detail says how to fix it; the exit code is 0 only when no required check
failed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from hypervisors.accel import choose_accelerator
from hypervisors.config import ConfigError, QemuConfig
from hypervisors.errors import HypervisorError
from hypervisors.qemu import VHOST_VSOCK_DEVICE
from sandbox.config import RuntimeConfig, load_config
from sandbox.errors import SandboxError

QEMU_VERSION_TIMEOUT = 10.0
#: The configuration keys `QemuConfig.check_files` looks at, with what to call them.
FILE_KEYS = {
    "path": "QEMU binary",
    "kernel": "guest kernel",
    "initrd": "guest initrd",
    "virtio_fs_daemon": "virtiofsd",
}


@dataclass(frozen=True)
class Check:
    """One line of the report. ``required=False`` lines are informational only."""

    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        """``ok    <name>: <detail>`` or ``FAIL  <name>: <detail>``."""
        return f"{'ok' if self.ok else 'FAIL':<5} {self.name}: {self.detail}"


def check_config(config_path: str | None) -> tuple[Check, RuntimeConfig | None]:
    """Find and parse the configuration file."""
    try:
        config = load_config(config_path)
    except SandboxError as e:
        text = str(e)
        if "make install" in text:  # not found: the message already lists the fixes
            return Check("configuration", False, f"{text}, or pass --config PATH"), None
        return Check("configuration", False, f"{text}; fix the file or pass --config PATH"), None
    detail = f"{config.path} (found and parsed)"
    if config.qemu.unknown_keys:
        detail += f"; ignored unknown [hypervisor.qemu] keys: {', '.join(config.qemu.unknown_keys)}"
    return Check("configuration", True, detail), config


def _checked_keys(qemu: QemuConfig) -> list[str]:
    keys = ["path", "kernel"]
    if qemu.initrd:
        keys.append("initrd")
    if qemu.shared_fs == "virtio-fs":
        keys.append("virtio_fs_daemon")
    return keys


def check_files(qemu: QemuConfig, source: str) -> list[Check]:
    """One line per file `QemuConfig.check_files` needs.

    ``check_files`` stops at the first problem; to report every missing file at once, a key
    that failed is set aside (pointed at this Python interpreter, an existing executable) and
    the check runs again, at most once per key.
    """
    failures: dict[str, str] = {}
    probe = qemu
    for _ in FILE_KEYS:
        try:
            probe.check_files(source)
            break
        except ConfigError as e:
            failures[e.key] = str(e)
            set_aside: dict[str, Any] = {e.key: sys.executable}
            probe = dataclasses.replace(probe, **set_aside)
    checks = []
    for key in _checked_keys(qemu):
        name = f"{FILE_KEYS[key]} ({key})"
        if key in failures:
            checks.append(Check(name, False, failures[key]))
        else:
            checks.append(Check(name, True, f"{getattr(qemu, key)} present"))
    return checks


def check_qemu_version(qemu_path: str) -> Check:
    """Run ``<qemu> --version``; its first line."""
    try:
        done = subprocess.run(
            [qemu_path, "--version"], capture_output=True, text=True,
            timeout=QEMU_VERSION_TIMEOUT, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("QEMU version", False, f"failed to run {qemu_path} --version: {e}")
    first = (done.stdout.strip().splitlines() or [""])[0]
    if done.returncode != 0 or not first:
        err = done.stderr.strip().splitlines()[:1] or [f"exit status {done.returncode}"]
        return Check(
            "QEMU version", False,
            f"{qemu_path} --version failed: {err[0]}; reinstall qemu-system-x86 (make deps)",
        )
    return Check("QEMU version", True, first)


def check_accelerator(requested: str) -> Check:
    """The accelerator a sandbox would use, and why."""
    try:
        choice = choose_accelerator(requested)
    except HypervisorError as e:
        fix = 'set accelerator = "auto" or "tcg" in [hypervisor.qemu], or make /dev/kvm usable'
        return Check("accelerator", False, f"{e}; {fix}")
    return Check("accelerator", True, f"{choice.accelerator} ({choice.reason})")


def check_vsock(device: str = VHOST_VSOCK_DEVICE) -> Check:
    """Informational: which agent channel a sandbox would use."""
    if os.path.exists(device):
        return Check("agent channel", True, f"{device} present -> vsock", required=False)
    return Check(
        "agent channel", True,
        f"{device} absent -> virtio-serial (modprobe vhost_vsock to use vsock)", required=False,
    )


def check_root() -> Check:
    """Sandboxes need root: QEMU with /dev/kvm, mounts, /run state."""
    euid = os.geteuid()
    if euid == 0:
        return Check("running as root", True, "euid 0")
    return Check(
        "running as root", False,
        f"euid {euid}; run as root (sudo): sandboxes mount filesystems and write /run",
    )


def run_checks(config_path: str | None) -> list[Check]:
    """All checks, in report order."""
    config_check, config = check_config(config_path)
    checks = [config_check]
    if config is not None:
        files = check_files(config.qemu, str(config.path))
        checks += files
        if files[0].ok:  # the QEMU binary is there
            checks.append(check_qemu_version(config.qemu.path))
        checks.append(check_accelerator(config.qemu.accelerator))
    checks += [check_vsock(), check_root()]
    return checks


def run(config_path: str | None, out: TextIO | None = None) -> int:
    """Print the report (to stdout by default); 0 if every required check passed, else 1."""
    out = out or sys.stdout
    checks = run_checks(config_path)
    for check in checks:
        out.write(check.line() + "\n")
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        names = ", ".join(c.name for c in failed)
        skipped = "" if checks[0].ok else " (file, QEMU and accelerator checks need it)"
        out.write(f"\nThis host cannot run sandboxes yet: {len(failed)} check(s) failed: "
                  f"{names}{skipped}; see the FAIL lines above for fixes.\n")
        return 1
    out.write("\nThis host can run VM-isolated sandboxes.\n")
    return 0
