"""What ``kata-runtime check`` asks of this host for StratoVirt: files, version, KVM, channel.

The checks reuse what a VM start uses (`StratovirtConfig.file_keys`, the KVM probe of
`hypervisors.accel`, the vhost-vsock test), so the verdict matches what the runtime would
do. A failing line's detail says how to fix it.
"""

from __future__ import annotations

from hypervisors import hostchecks
from hypervisors.base import HostCheck
from hypervisors.errors import HypervisorError
from hypervisors.stratovirt import vm
from hypervisors.stratovirt.config import SECTION, StratovirtConfig
from hypervisors.vmm import VHOST_VSOCK_DEVICE, host_has_vhost_vsock

#: ``stratovirt --help``: "-V, --version  Prints version information" ("StratoVirt x.y.z").
VERSION_FLAG = "-V"
FILE_NAMES = {
    "path": "StratoVirt binary",
    "kernel": "guest kernel",
    "initrd": "guest initrd",
    "virtio_fs_daemon": "virtiofsd",
}


def check_files(config: StratovirtConfig, source: str = "<config>") -> list[HostCheck]:
    """One line per file the configuration needs, every missing one reported."""
    values = {key: getattr(config, key) for key, _, _ in config.file_keys()}
    return hostchecks.check_files(SECTION, config.file_keys(), values, FILE_NAMES, source)


def check_version(path: str) -> HostCheck:
    """Run ``<stratovirt> -V``; its first line."""
    return hostchecks.check_version("StratoVirt", [path, VERSION_FLAG], "reinstall StratoVirt")


def check_kvm() -> HostCheck:
    """StratoVirt runs only on KVM (config_guidebook.md 1.1: the one accel is kvm)."""
    try:
        choice = vm.choose_accelerator()  # the probe a VM start uses
    except HypervisorError as e:
        return HostCheck("accelerator", False,
                         f"{e}; StratoVirt runs only on KVM: make /dev/kvm usable, or use "
                         "[hypervisor.qemu] on this host")  # fmt: skip
    return HostCheck("accelerator", True, choice.reason)


def check_agent_channel(config: StratovirtConfig) -> HostCheck:
    """Informational: which agent channel a VM would use."""
    if config.use_vsock and host_has_vhost_vsock():
        return HostCheck("agent channel", True, f"{VHOST_VSOCK_DEVICE} present -> vsock",
                         required=False)  # fmt: skip
    why = "use_vsock = false" if not config.use_vsock else f"{VHOST_VSOCK_DEVICE} absent"
    return HostCheck(
        "agent channel", False,
        f"{why} -> virtio-serial port (config_guidebook.md 2.4, which allows one port on "
        "microvm; untested with a real StratoVirt): modprobe vhost_vsock and set "
        "use_vsock = true for the channel Kata uses",
        required=False,
    )


def host_checks(config: StratovirtConfig, source: str = "<config>") -> list[HostCheck]:
    """Every StratoVirt check, in report order."""
    files = check_files(config, source)
    checks = list(files)
    if files[0].ok:  # the StratoVirt binary is there
        checks.append(check_version(config.path))
    return [*checks, check_kvm(), check_agent_channel(config)]
