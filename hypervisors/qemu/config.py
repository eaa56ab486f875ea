"""`QemuConfig`: the ``[hypervisor.qemu]`` table of configuration.toml, parsed and checked.

Field names and defaults follow Kata's ``[hypervisor.qemu]``. Keys this version parses but
cannot act on are listed in `QemuConfig.unsupported_keys` when they are set to anything
that would need acting on (annotations are never honoured yet, so ``enable_annotations``
and ``valid_hypervisor_paths`` have no effect): the sandbox layer reports them with the
file and line, as it does unknown keys.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypervisors.annotations import AnnotationError
from hypervisors.annotations import apply as apply_annotations
from hypervisors.channel import VSOCK_BACKENDS
from hypervisors.config import (
    ConfigError,
    KeyProblem,
    Parser,
    abs_path,
    boolean,
    int_at_least,
    need_file,
    nonempty,
    one_of,
    optional_abs_path,
    parse_section,
    str_list,
    string,
)
from hypervisors.qemu.kernelfile import pvh_problem

NAME = "qemu"
SECTION = f"hypervisor.{NAME}"
ACCELERATORS = ("auto", "kvm", "tcg")
SHARED_FS_KINDS = ("virtio-fs", "virtio-9p", "none")
VIRTIO_FS_CACHE_MODES = ("auto", "always", "none")
MIN_MEMORY_MIB = 64
#: The guest's memory block on x86-64: hot-plugged DIMMs come in multiples of it, and the
#: root image's size must be one, since it takes a memory-device slot and a DIMM plugged
#: after it must start on a block boundary.
MEMORY_BLOCK_MIB = 128
#: The machine whose virtio devices are virtio-mmio: no PCI bus.
MICROVM = "microvm"
DEFAULT_SECCOMP_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class QemuConfig:
    """QEMU settings (Kata's key names)."""

    path: str = "/usr/bin/qemu-system-x86_64"
    #: An uncompressed ELF kernel with a PVH entry (booted directly) or a bzImage. Kata's
    #: default file name.
    kernel: str = "/usr/share/kata-containers/vmlinux.container"
    initrd: str = "/usr/share/kata-containers/kata-containers-initrd.img"
    #: The guest's files as a read-only ext4 image every VM maps (virtio-pmem, DAX) instead
    #: of its own copy in an initramfs; ``initrd`` is then the small loader that mounts it
    #: (build/README.md, "Shared root image"). "" = none. Kata's key.
    image: str = ""
    machine_type: str = "q35"
    kernel_params: str = ""
    default_vcpus: int = 1
    #: 0 means "same as default_vcpus" (no CPU hotplug headroom).
    default_maxvcpus: int = 0
    #: MiB.
    default_memory: int = 2048
    #: MiB a VM may have at most (pods sized from their limits); 0 = the host's memory.
    default_maxmemory: int = 0
    #: DIMM slots for memory hot-plug when a pod grows; 0 (the default) turns it off: the
    #: headroom costs every pod VM ~120 MiB of host memory and ~0.25 s of boot (measured).
    memory_slots: int = 0
    accelerator: str = "auto"
    shared_fs: str = "virtio-fs"
    virtio_fs_daemon: str = "/usr/lib/qemu/virtiofsd"
    virtio_fs_cache: str = "auto"
    virtio_fs_extra_args: tuple[str, ...] = ()
    valid_hypervisor_paths: tuple[str, ...] = ()
    enable_annotations: tuple[str, ...] = ()
    #: QEMU's ``-sandbox`` (seccomp) options; "" turns it off. On unless asked otherwise.
    seccompsandbox: str = DEFAULT_SECCOMP_SANDBOX
    #: Whether pods may run under TCG, which QEMU's security policy does not treat as a
    #: security boundary. Off unless the configuration says so.
    allow_tcg: bool = False
    #: Firmware for ``-bios``; "" = QEMU's own for the machine (SeaBIOS on q35, qboot on
    #: microvm). Kata's key.
    firmware: str = ""
    #: CPU properties added to the model (``-cpu max,<these>`` under TCG, ``host,<these>``
    #: under KVM), comma-separated, e.g. "pmu=off" or "-la57". Kata's key.
    cpu_features: str = ""
    #: MiB of TCG translation cache (``-accel tcg,tb-size=``); 0 = QEMU's default (1 GiB,
    #: reserved, filled as guest code is translated). Ignored under KVM.
    tcg_tb_size_mib: int = 0
    #: A virtio-balloon with free page reporting: the guest hands pages it frees back to the
    #: host. Kata's key.
    reclaim_guest_freed_memory: bool = False
    #: The agent channel: vsock (false: virtio-serial), through the host kernel or our
    #: vhost-user back-end (`hypervisors.channel`).
    use_vsock: bool = True
    vsock_backend: str = "auto"
    #: Keys found in the table that this version does not know (ignored, reported).
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        """The section name."""
        return NAME

    @property
    def unsupported_keys(self) -> tuple[str, ...]:
        """Keys set to a value this version does not act on."""
        return ()

    def with_annotations(self, annotations: Mapping[str, str], source: str) -> QemuConfig:
        """This configuration with the pod's allowed hypervisor annotations applied (and
        the keys' relations checked again: an annotation may break one)."""
        config = apply_annotations(self, annotations, _PARSERS, SECTION, source)
        if config is not self:
            try:
                config._check_relations(source)
            except ConfigError as e:
                raise AnnotationError(f"the pod's hypervisor annotations: {e}") from None
        return config

    @classmethod
    def from_table(cls, table: dict[str, Any] | Any, source: str = "<config>") -> QemuConfig:
        """Parse the table; `ConfigError` on the first bad key (files are not checked)."""
        config = parse_section(cls, SECTION, table, _PARSERS, source)
        config._check_relations(source)
        return config

    def _check_relations(self, source: str) -> None:
        if self.image and is_mmio(self.machine_type):
            raise ConfigError(
                SECTION, "image", self.image,
                f"needs PCI (virtio-pmem) and machine_type {self.machine_type!r} has none",
                'set image = "" to boot the full initrd, or use machine_type = "q35"', source)
        if self.image and not self.initrd:
            raise ConfigError(
                SECTION, "image", self.image, "is mounted by the loader initrd, and initrd "
                "is empty", "set initrd to the image's loader (kata-containers-image-"
                "loader.img where the package installs it, rootfs-loader.img from `make "
                "guest`)", source)
        if self.default_maxvcpus and self.default_maxvcpus < self.default_vcpus:
            raise ConfigError(
                SECTION, "default_maxvcpus", self.default_maxvcpus,
                f"is below default_vcpus ({self.default_vcpus})",
                "set it to 0 or to at least default_vcpus", source,
            )

    def check_files(self, source: str = "<config>") -> None:
        """Check that the binaries and guest images named here exist, then what is in them
        (`check_contents`)."""
        for key, fix, exe in self.file_keys():
            need_file(SECTION, key, getattr(self, key), fix, source, exe=exe)
        self.check_contents(source)

    def check_contents(self, source: str = "<config>") -> None:
        """Of files that exist: whether QEMU can boot the kernel (a bzImage, or an ELF with
        its PVH entry note), and the root image's size."""
        if problem := pvh_problem(self.kernel):
            raise ConfigError(
                SECTION, "kernel", self.kernel, problem,
                "use the kernel's bzImage (vmlinuz) or a vmlinux built with CONFIG_PVH=y "
                "(`make guest` writes both)", source)
        if self.image and (size := os.stat(self.image).st_size) % (MEMORY_BLOCK_MIB << 20):
            raise ConfigError(
                SECTION, "image", self.image,
                f"is {size} bytes, not a multiple of 128 MiB (the guest's memory block)",
                f"grow it to one (truncate -s %128M {self.image}: sparse, no filesystem "
                "change) or rebuild it with `make guest`", source)

    def file_keys(self) -> list[tuple[str, str, bool]]:
        """(key, how to fix it, must be executable) for every file this configuration needs."""
        keys = [("path", "install qemu-system-x86 (make deps)", True),
                ("kernel", "run `make guest`", False)]  # fmt: skip
        if self.initrd:
            keys.append(("initrd", "run `make guest`", False))
        if self.image:
            keys.append(("image", "run `make guest`", False))
        if self.firmware:
            keys.append(("firmware", "install qemu-system-x86 (it ships /usr/share/qemu/"
                         "qboot.rom)", False))
        if self.shared_fs == "virtio-fs":
            keys.append(("virtio_fs_daemon",
                         "install qemu-system-x86 (it ships /usr/lib/qemu/virtiofsd)", True))
        return keys

    def settings(self) -> dict[str, Any]:
        """Every setting as plain JSON values."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # fmt: skip


def is_mmio(machine_type: str) -> bool:
    """Whether virtio devices of this machine are virtio-mmio (no PCI bus)."""
    return machine_type == MICROVM


#: One QEMU CPU property: ``name=value``, ``+name`` or ``-name`` (no commas, nothing else).
_CPU_FEATURE = re.compile(r"[+-]?[A-Za-z0-9_.-]+(=[A-Za-z0-9_.-]+)?")


def cpu_features(key: str, value: object, source: str) -> str:
    """Comma-separated CPU properties; each checked, so none can add another QEMU option."""
    text = string(key, value, source).strip()
    bad = [f for f in text.split(",") if not _CPU_FEATURE.fullmatch(f)] if text else []
    if bad:
        raise KeyProblem(f"has {bad[0]!r}, which is not a CPU property",
                         'write properties as QEMU takes them: "pmu=off,-la57"')
    return text


_PARSERS: dict[str, Parser] = {
    "path": abs_path,
    "kernel": abs_path,
    "initrd": optional_abs_path,
    "image": optional_abs_path,
    "machine_type": nonempty,
    "kernel_params": string,
    "default_vcpus": int_at_least(1),
    "default_maxvcpus": int_at_least(0),
    "default_memory": int_at_least(MIN_MEMORY_MIB),
    "default_maxmemory": int_at_least(0),
    "memory_slots": int_at_least(0),
    "accelerator": one_of(ACCELERATORS),
    "shared_fs": one_of(SHARED_FS_KINDS),
    "virtio_fs_daemon": abs_path,
    "virtio_fs_cache": one_of(VIRTIO_FS_CACHE_MODES),
    "virtio_fs_extra_args": str_list,
    "valid_hypervisor_paths": str_list,
    "enable_annotations": str_list,
    "seccompsandbox": string,
    "allow_tcg": boolean,
    "firmware": optional_abs_path,
    "cpu_features": cpu_features,
    "tcg_tb_size_mib": int_at_least(0),
    "reclaim_guest_freed_memory": boolean,
    "use_vsock": boolean,
    "vsock_backend": one_of(VSOCK_BACKENDS),
}
