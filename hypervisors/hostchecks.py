"""`kata-runtime check` lines every driver needs alike: its files and its binary's version.

A driver's own ``checks`` module adds what is particular to it (accelerator, agent
channel) and names things its way (``FILE_NAMES``, the product name)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from hypervisors.base import HostCheck
from hypervisors.config import ConfigError, need_file

VERSION_TIMEOUT = 10.0


def check_files(section: str, file_keys: Sequence[tuple[str, str, bool]],
                values: Mapping[str, str], names: Mapping[str, str],
                source: str) -> list[HostCheck]:
    """One line per (key, fix, executable) in ``file_keys``, every missing one reported
    with the same `ConfigError` text a sandbox start gives."""
    checks = []
    for key, fix, exe in file_keys:
        value = values[key]
        name = f"{names[key]} ({key})"
        try:
            need_file(section, key, value, fix, source, exe=exe)
        except ConfigError as e:
            checks.append(HostCheck(name, False, str(e)))
        else:
            checks.append(HostCheck(name, True, f"{value} present"))
    return checks


def check_version(product: str, argv: Sequence[str], fix: str) -> HostCheck:
    """Run ``argv`` (the binary's version flag); the first line it prints."""
    label, shown = f"{product} version", " ".join(argv)
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=VERSION_TIMEOUT, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        return HostCheck(label, False, f"failed to run {shown}: {e}")
    first = (done.stdout.strip().splitlines() or [""])[0]
    if done.returncode != 0 or not first:
        err = done.stderr.strip().splitlines()[:1] or [f"exit status {done.returncode}"]
        return HostCheck(label, False, f"{shown} failed: {err[0]}; {fix}")
    return HostCheck(label, True, first)
