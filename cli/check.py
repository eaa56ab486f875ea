"""`kata-runtime check`: can this host run VM-isolated sandboxes, and if not, why not.

Theory of operation: each check is a `HostCheck` line (name, pass/fail, detail, required).
The configuration is loaded as the shim loads it (its warnings become informational
lines); the configured hypervisor's driver contributes its own lines (files, binary
version, accelerator, agent channel) through `sandbox.inspect.host_checks`, so the verdict
matches what a sandbox start would do. Then the exec wrapper every helper is spawned
through, root, and containerd: its version (``containerd --version``) and whether its
configuration has a CRI runtime handler of ours (runtime_type ``io.containerd.kata.v2`` or
``io.containerd.kata-<variant>.v2``). The containerd lines are warnings, not failures: `ctr`
needs no handler, and a containerd may live outside PATH. A failing line's detail says how
to fix it; the exit code is 0 only when no required check failed. ``--json`` prints the
same lines and verdict as one object (docs/cli.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from cli import containerd_config
from sandbox import template, vmcache
from sandbox.config import ConfigNotFoundError, RuntimeConfig, load_config
from sandbox.errors import SandboxError
from sandbox.inspect import HostCheck, exec_wrapper, host_checks


def line(check: HostCheck) -> str:
    """``ok    <name>: <detail>``, ``FAIL  <name>: <detail>`` or ``warn  ...``."""
    word = {"ok": "ok", "fail": "FAIL", "warn": "warn"}[result(check)]
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


def check_template(config: RuntimeConfig) -> HostCheck:
    """With ``enable_template``: will pods be restored from the template? (Informational:
    pods boot without it.)"""
    doc = template.status(config)
    if doc["usable"]:
        return HostCheck("VM template", True, f"{doc['path']}: pods are restored from it",
                         required=False)
    return HostCheck("VM template", False, f"{doc['path']}: not usable, pods boot: "
                     f"{doc['reason']}", required=False)


def check_vm_cache(config: RuntimeConfig) -> HostCheck:
    """With ``vm_cache_number``: does a cache serve pods? (Informational: pods boot without.)"""
    doc = vmcache.status(config)
    where = doc["endpoint"]
    if doc["serving"] and not doc["reason"]:
        return HostCheck("VM cache", True, f"{where}: {doc['ready']} of "
                         f"{doc['vm_cache_number']} VMs ready, {doc['claimed']} in pods",
                         required=False)
    why = doc["reason"] or "no VM ready"
    return HostCheck("VM cache", False, f"{where}: pods boot: {why} (run `kata-runtime "
                     "factory init` as a service)", required=False)


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


CONTAINERD_TIMEOUT = 10.0


def check_containerd_version() -> HostCheck:
    """``containerd --version``; a warning when there is no containerd to ask."""
    binary = shutil.which("containerd")
    if binary is None:
        return HostCheck("containerd", False, "`containerd` not found on PATH (Debian: "
                         "apt-get install containerd)", required=False)
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=CONTAINERD_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return HostCheck("containerd", False, f"{binary} --version failed: {e}", required=False)
    first = (done.stdout.strip().splitlines() or [""])[0]
    if done.returncode != 0 or not first:
        why = done.stderr.strip()[:200] or f"exit status {done.returncode}"
        return HostCheck("containerd", False, f"{binary} --version failed: {why}",
                         required=False)
    return HostCheck("containerd", True, first, required=False)


def check_containerd_handler(file: str) -> HostCheck:
    """Does containerd's configuration `file` have a CRI runtime handler of ours?"""
    name = "containerd CRI handler"
    fix = "`kata-runtime containerd-config add`, then restart containerd"
    try:
        doc = containerd_config.parse_file(Path(file))
    except FileNotFoundError:
        return HostCheck(name, False, f"{file} does not exist: containerd runs with its "
                         f"built-in defaults, which have no handler for this runtime; {fix}",
                         required=False)
    except (OSError, containerd_config.ConfigEditError) as e:
        return HostCheck(name, False, f"{file}: {e}", required=False)
    handlers = containerd_config.kata_handlers(doc)
    if not handlers:
        return HostCheck(name, False, f"no runtime handler with runtime_type "
                         f"{containerd_config.RUNTIME_TYPE} (or io.containerd.kata-<variant>.v2)"
                         f" in {file}; {fix}", required=False)
    found = ", ".join(f"{handler} ({kind})" for handler, kind in handlers)
    return HostCheck(name, True, f"{found} in {file}", required=False)


def run_checks(config_path: str | None,
               containerd_file: str = containerd_config.DEFAULT_CONTAINERD_CONFIG,
               ) -> list[HostCheck]:
    """All checks, in report order."""
    checks, config = check_config(config_path)
    if config is not None:
        checks += host_checks(config)
        if config.factory.enable_template:
            checks.append(check_template(config))
        if config.factory.vm_cache_number:
            checks.append(check_vm_cache(config))
    checks += [check_exec_wrapper(), check_root(), check_containerd_version(),
               check_containerd_handler(containerd_file)]
    return checks


def result(check: HostCheck) -> str:
    """``ok``, ``fail`` (a required check failed) or ``warn``."""
    return "ok" if check.ok else ("fail" if check.required else "warn")


def report_doc(checks: list[HostCheck]) -> dict[str, Any]:
    """The ``--json`` object: the verdict, the failed required checks, every line."""
    failed = [c.name for c in checks if c.required and not c.ok]
    return {"ok": not failed, "failed": failed,
            "checks": [{"name": c.name, "result": result(c), "required": c.required,
                        "detail": c.detail} for c in checks]}


def run(config_path: str | None, out: TextIO | None = None, as_json: bool = False,
        containerd_file: str = containerd_config.DEFAULT_CONTAINERD_CONFIG) -> int:
    """Print the report (to stdout by default); 0 if every required check passed, else 1."""
    out = out or sys.stdout
    checks = run_checks(config_path, containerd_file)
    failed = [c for c in checks if c.required and not c.ok]
    if as_json:
        out.write(json.dumps(report_doc(checks), indent=2) + "\n")
        return 1 if failed else 0
    for check in checks:
        out.write(line(check) + "\n")
    if failed:
        names = ", ".join(c.name for c in failed)
        skipped = "" if checks[0].ok else " (the hypervisor's checks need it)"
        out.write(f"\nThis host cannot run sandboxes yet: {len(failed)} check(s) failed: "
                  f"{names}{skipped}; see the FAIL lines above for fixes.\n")
        return 1
    out.write("\nThis host can run VM-isolated sandboxes.\n")
    return 0
