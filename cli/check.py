"""`kata-runtime check`: can this host run VM-isolated sandboxes, and if not, why not.

Theory of operation: each check is a `HostCheck` line (name, pass/fail, detail, required).
The configuration is loaded as the shim loads it (its warnings become informational
lines); the configured hypervisor's driver contributes its own lines (files, binary
version, accelerator, agent channel) through `sandbox.inspect.host_checks`, so the verdict
matches what a sandbox start would do. Then the exec wrapper every helper is spawned
through, and root. A failing line's detail says how to fix it; the exit code is 0 only when
no required check failed.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from sandbox.config import ConfigNotFoundError, RuntimeConfig, load_config
from sandbox.errors import SandboxError
from sandbox.inspect import HostCheck, exec_wrapper, host_checks


def line(check: HostCheck) -> str:
    """``ok    <name>: <detail>``, ``FAIL  <name>: <detail>`` or ``warn  ...``."""
    word = "ok" if check.ok else ("FAIL" if check.required else "warn")
    return f"{word:<5} {check.name}: {check.detail}"


def check_config(config_path: str | None) -> tuple[list[HostCheck], RuntimeConfig | None]:
    """Find and parse the configuration file; its warnings as informational lines."""
    try:
        config = load_config(config_path)
    except ConfigNotFoundError as e:  # the message already lists the fixes
        return [HostCheck("configuration", False, f"{e}, or pass --config PATH")], None
    except SandboxError as e:
        return [HostCheck("configuration", False, f"{e}; fix the file or pass --config PATH")], None
    checks = [HostCheck("configuration", True, f"{config.path} (found and parsed)")]
    checks += [HostCheck("configuration", False, w, required=False) for w in config.warnings]
    return checks, config


def check_exec_wrapper() -> HostCheck:
    """The wrapper that ties helpers' lives to the shim's."""
    try:
        return HostCheck("exec wrapper", True, exec_wrapper())
    except OSError as e:
        fix = "(Debian: apt-get install util-linux)"
        return HostCheck("exec wrapper", False, f"{e.strerror} {fix}")


def check_root() -> HostCheck:
    """Sandboxes need root: VMMs with /dev/kvm, mounts, /run state."""
    euid = os.geteuid()
    if euid == 0:
        return HostCheck("running as root", True, "euid 0")
    return HostCheck(
        "running as root", False,
        f"euid {euid}; run as root (sudo): sandboxes mount filesystems and write /run",
    )


def run_checks(config_path: str | None) -> list[HostCheck]:
    """All checks, in report order."""
    checks, config = check_config(config_path)
    if config is not None:
        checks += host_checks(config)
    checks += [check_exec_wrapper(), check_root()]
    return checks


def run(config_path: str | None, out: TextIO | None = None) -> int:
    """Print the report (to stdout by default); 0 if every required check passed, else 1."""
    out = out or sys.stdout
    checks = run_checks(config_path)
    for check in checks:
        out.write(line(check) + "\n")
    failed = [c for c in checks if c.required and not c.ok]
    if failed:
        names = ", ".join(c.name for c in failed)
        skipped = "" if checks[0].ok else " (the hypervisor's checks need it)"
        out.write(f"\nThis host cannot run sandboxes yet: {len(failed)} check(s) failed: "
                  f"{names}{skipped}; see the FAIL lines above for fixes.\n")
        return 1
    out.write("\nThis host can run VM-isolated sandboxes.\n")
    return 0
