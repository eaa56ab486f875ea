"""`StratovirtConfig`: the ``[hypervisor.stratovirt]`` table of a configuration, parsed and
checked.

Key names follow Kata's ``configuration-stratovirt.toml``. The driver builds StratoVirt's
lightweight ``microvm`` machine only (virtio-mmio devices, config_guidebook.md 2 "Device
Configuration"), boots a kernel and an initrd (1.6, 1.7), and runs only on KVM (1.1: the
only ``accel`` is ``kvm``), so ``machine_type``, ``block_device_driver`` and
``accelerator`` each accept the one value the driver builds.

Keys this version parses but does not act on are listed in
`StratovirtConfig.unsupported_keys` whenever they are set to a value that would need
acting on; the sandbox layer reports them with the file and line, as it does unknown keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypervisors.annotations import AnnotationError
from hypervisors.annotations import apply as apply_annotations
from hypervisors.config import (
    ConfigError,
    Parser,
    abs_path,
    boolean,
    int_at_least,
    need_file,
    one_of,
    optional_abs_path,
    parse_section,
    str_list,
    string,
)

NAME = "stratovirt"
SECTION = f"hypervisor.{NAME}"
MACHINE_TYPES = ("microvm",)
BLOCK_DEVICE_DRIVERS = ("virtio-mmio",)
ACCELERATORS = ("kvm",)  # config_guidebook.md 1.1: "accel: ... supported value kvm"
SHARED_FS_KINDS = ("virtio-fs", "none")  # no virtio-9p in StratoVirt (2.17 Virtio-fs only)
VIRTIO_FS_CACHE_MODES = ("auto", "always", "none")
#: config_guidebook.md 1.3.1 Memory Size: "The supported VM memory size is among [128M, 512G]".
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 512 << 10
#: config_guidebook.md 1.2.1 CPU Number: "The maximum value is 254".
MAX_VCPUS = 254
INSTALL_FIX = "install StratoVirt (openEuler: dnf install stratovirt)"


@dataclass(frozen=True)
class StratovirtConfig:
    """StratoVirt settings (Kata's key names)."""

    path: str = "/usr/bin/stratovirt"
    kernel: str = "/usr/share/kata-containers/vmlinuz.container"
    initrd: str = "/usr/share/kata-containers/kata-containers-initrd.img"
    #: A guest root disk image (Kata's alternative to initrd): not supported, reported.
    image: str = ""
    machine_type: str = "microvm"
    kernel_params: str = ""
    block_device_driver: str = "virtio-mmio"
    #: The agent channel: vsock where /dev/vhost-vsock exists (else virtio-serial, with a
    #: warning); false: always virtio-serial.
    use_vsock: bool = True
    accelerator: str = "kvm"
    #: StratoVirt has no software emulation: true is reported, and changes nothing.
    allow_tcg: bool = False
    default_vcpus: int = 1
    #: 0 means "same as default_vcpus". Caps a pod's VM at boot; no CPU hot-plug on microvm.
    default_maxvcpus: int = 0
    #: MiB.
    default_memory: int = 2048
    #: MiB a VM may have at most (pods sized from their limits); 0 = the host's memory.
    default_maxmemory: int = 0
    #: No memory hot-plug on microvm: anything above 0 is reported.
    memory_slots: int = 0
    shared_fs: str = "virtio-fs"
    virtio_fs_daemon: str = "/usr/lib/qemu/virtiofsd"
    virtio_fs_cache: str = "auto"
    virtio_fs_extra_args: tuple[str, ...] = ()
    #: Kata's: put the VMM in the sandbox cgroup. Here [runtime] sandbox_cgroup_only does.
    sandbox_cgroup_with_emulator: bool = False
    #: Kata's: keep the VMM in the host's network namespace. Not acted on.
    disable_new_netns: bool = False
    #: Container rootfs never goes through block devices here (virtio-fs): nothing to do.
    disable_block_device_use: bool = False
    #: virtio-net runs in StratoVirt on plain tap fds; vhost-net is never used.
    disable_vhost_net: bool = True
    #: StratoVirt's log level "info" instead of "error" (config_guidebook.md 1.9 Logging).
    enable_debug: bool = False
    valid_hypervisor_paths: tuple[str, ...] = ()
    enable_annotations: tuple[str, ...] = ()
    #: Keys found in the table that this version does not know (ignored, reported).
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        """The section name."""
        return NAME

    @property
    def unsupported_keys(self) -> tuple[str, ...]:
        """Keys set to a value this version does not act on."""
        needs_action = {
            "image": bool(self.image),
            "allow_tcg": self.allow_tcg,
            "memory_slots": self.memory_slots > 0,
            "sandbox_cgroup_with_emulator": self.sandbox_cgroup_with_emulator,
            "disable_new_netns": self.disable_new_netns,
            "disable_vhost_net": not self.disable_vhost_net,
        }
        return tuple(sorted(key for key, set_ in needs_action.items() if set_))

    def with_annotations(self, annotations: Mapping[str, str], source: str) -> StratovirtConfig:
        """This configuration with the pod's allowed hypervisor annotations applied."""
        config = apply_annotations(self, annotations, _PARSERS, SECTION, source)
        try:
            config._check_relations(source)
        except ConfigError as e:  # e.g. default_vcpus annotated above default_maxvcpus
            raise AnnotationError(f"pod annotations for [{SECTION}]: {e}") from None
        return config

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str = "<config>") -> StratovirtConfig:
        """Parse the table; `ConfigError` on the first bad key (files are not checked)."""
        config = parse_section(cls, SECTION, table, _PARSERS, source)
        config._check_relations(source)
        return config

    def _check_relations(self, source: str) -> None:
        if self.default_maxvcpus and self.default_maxvcpus < self.default_vcpus:
            raise ConfigError(
                SECTION, "default_maxvcpus", self.default_maxvcpus,
                f"is below default_vcpus ({self.default_vcpus})",
                "set it to 0 or to at least default_vcpus", source,
            )
        for key in ("default_vcpus", "default_maxvcpus"):
            if getattr(self, key) > MAX_VCPUS:
                raise ConfigError(SECTION, key, getattr(self, key),
                                  f"is above StratoVirt's {MAX_VCPUS} vCPUs",
                                  f"use {MAX_VCPUS} or fewer", source)  # fmt: skip
        for key in ("default_memory", "default_maxmemory"):
            if getattr(self, key) > MAX_MEMORY_MIB:
                raise ConfigError(SECTION, key, getattr(self, key),
                                  f"is above StratoVirt's {MAX_MEMORY_MIB} MiB (512G)",
                                  f"use {MAX_MEMORY_MIB} or less", source)  # fmt: skip
        if self.image and not self.initrd:
            raise ConfigError(SECTION, "image", self.image,
                              "is not supported: this version boots from an initrd",
                              'set initrd (and image = "")', source)  # fmt: skip

    def check_files(self, source: str = "<config>") -> None:
        """Check that the binaries and guest images named here exist."""
        for key, fix, exe in self.file_keys():
            need_file(SECTION, key, getattr(self, key), fix, source, exe=exe)

    def file_keys(self) -> list[tuple[str, str, bool]]:
        """(key, how to fix it, must be executable) for every file this configuration needs."""
        keys = [("path", INSTALL_FIX, True), ("kernel", "run `make guest`", False)]
        if self.initrd:
            keys.append(("initrd", "run `make guest`", False))
        if self.shared_fs == "virtio-fs":
            keys.append(("virtio_fs_daemon",
                         "install virtiofsd (Debian: qemu-system-x86 ships /usr/lib/qemu/"
                         "virtiofsd)", True))  # fmt: skip
        return keys

    def settings(self) -> dict[str, Any]:
        """Every setting as plain JSON values."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # fmt: skip


_PARSERS: dict[str, Parser] = {
    "path": abs_path,
    "kernel": abs_path,
    "initrd": optional_abs_path,
    "image": optional_abs_path,
    "machine_type": one_of(MACHINE_TYPES),
    "kernel_params": string,
    "block_device_driver": one_of(BLOCK_DEVICE_DRIVERS),
    "use_vsock": boolean,
    "accelerator": one_of(ACCELERATORS),
    "allow_tcg": boolean,
    "default_vcpus": int_at_least(1),
    "default_maxvcpus": int_at_least(0),
    "default_memory": int_at_least(MIN_MEMORY_MIB),
    "default_maxmemory": int_at_least(0),
    "memory_slots": int_at_least(0),
    "shared_fs": one_of(SHARED_FS_KINDS),
    "virtio_fs_daemon": abs_path,
    "virtio_fs_cache": one_of(VIRTIO_FS_CACHE_MODES),
    "virtio_fs_extra_args": str_list,
    "sandbox_cgroup_with_emulator": boolean,
    "disable_new_netns": boolean,
    "disable_block_device_use": boolean,
    "disable_vhost_net": boolean,
    "enable_debug": boolean,
    "valid_hypervisor_paths": str_list,
    "enable_annotations": str_list,
}
