"""What ``kata-runtime check`` asks of this host for QEMU: files, version, accelerator, channel.

The checks reuse what a VM start uses (`QemuConfig.file_keys`, `choose_accelerator`, the
vhost-vsock test), so the verdict matches what the runtime would do. A failing line's
detail says how to fix it.
"""

from __future__ import annotations

from hypervisors import hostchecks
from hypervisors.accel import choose_accelerator
from hypervisors.base import HostCheck
from hypervisors.channel import ChannelError, choose_channel
from hypervisors.config import ConfigError
from hypervisors.errors import HypervisorError
from hypervisors.qemu.config import SECTION, QemuConfig
from hypervisors.qemu.vm import host_has_vhost_vsock

#: What to call each file key in the report.
FILE_NAMES = {
    "path": "QEMU binary",
    "kernel": "guest kernel",
    "initrd": "guest initrd",
    "image": "guest root image",
    "virtio_fs_daemon": "virtiofsd",
}


def check_files(config: QemuConfig, source: str = "<config>") -> list[HostCheck]:
    """One line per file the configuration needs, every missing one reported; when all
    exist, the line of a file QEMU could not use (`QemuConfig.check_contents`) fails."""
    values = {key: getattr(config, key) for key, _, _ in config.file_keys()}
    checks = hostchecks.check_files(SECTION, config.file_keys(), values, FILE_NAMES, source)
    if all(c.ok for c in checks):
        try:
            config.check_contents(source)
        except ConfigError as e:
            name = f"{FILE_NAMES[e.key]} ({e.key})"
            checks = [HostCheck(name, False, str(e)) if c.name == name else c for c in checks]
    return checks


def check_version(qemu_path: str) -> HostCheck:
    """Run ``<qemu> --version``; its first line."""
    return hostchecks.check_version("QEMU", [qemu_path, "--version"],
                                    "reinstall qemu-system-x86 (make deps)")


def check_accelerator(requested: str, allow_tcg: bool) -> list[HostCheck]:
    """The accelerator a VM would use, and why; under TCG, whether pods may run there."""
    try:
        choice = choose_accelerator(requested)
    except HypervisorError as e:
        fix = f'set accelerator = "auto" or "tcg" in [{SECTION}], or make /dev/kvm usable'
        return [HostCheck("accelerator", False, f"{e}; {fix}")]
    checks = [HostCheck("accelerator", True, f"{choice.accelerator} ({choice.reason})")]
    if choice.accelerator == "tcg":
        boundary = "guests run under TCG, which QEMU does not treat as a security boundary"
        if allow_tcg:
            checks.append(HostCheck("security boundary", False,
                                    f"{boundary} (allowed: allow_tcg = true)", required=False))
        else:
            checks.append(HostCheck("security boundary", False,
                                    f"{boundary}; pods are refused until allow_tcg = true "
                                    f"is set in [{SECTION}]"))  # fmt: skip
    return checks


def check_agent_channel(config: QemuConfig, templates: bool = False) -> HostCheck:
    """Which agent channel a pod's VM would use and why (`hypervisors.channel`); a failure
    when ``vsock_backend = "kernel"`` cannot be met here."""
    try:
        choice = choose_channel(config.use_vsock, config.vsock_backend, host_has_vhost_vsock(),
                                templates)
    except ChannelError as e:
        return HostCheck("agent channel", False, str(e))
    return HostCheck("agent channel", True, f"{choice.channel.value} ({choice.reason})",
                     required=False)


def host_checks(config: QemuConfig, source: str = "<config>") -> list[HostCheck]:
    """Every QEMU check, in report order."""
    files = check_files(config, source)
    checks = list(files)
    if files[0].ok:  # the QEMU binary is there
        checks.append(check_version(config.path))
    checks += [*check_accelerator(config.accelerator, config.allow_tcg),
               check_agent_channel(config)]
    return checks
