"""`QemuConfig`: the ``[hypervisor.qemu]`` table of configuration.toml, parsed and checked.

Theory of operation: `QemuConfig.from_table` takes the already-decoded TOML table (a mapping),
checks each known key's type and range, optionally checks that the files it names exist, and
returns a frozen `QemuConfig`. Every problem is a `ConfigError` that names the key, the bad
value and how to fix it. Keys this version does not know are ignored but kept in
`QemuConfig.unknown_keys` so the caller can warn about typos. Constructing `QemuConfig(...)`
directly performs no checks (tests and annotation overrides use `dataclasses.replace`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SECTION = "hypervisor.qemu"
ACCELERATORS = ("auto", "kvm", "tcg")
SHARED_FS_KINDS = ("virtio-fs", "virtio-9p", "none")
VIRTIO_FS_CACHE_MODES = ("auto", "always", "none")
MIN_MEMORY_MIB = 64


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which key, why, and how to fix it."""

    def __init__(self, key: str, value: object, problem: str, fix: str, source: str) -> None:
        """Build ``<section>.<key>: <value> <problem>; <fix> (in <source>)``."""
        shown = value if isinstance(value, str) and value.startswith("/") else repr(value)
        super().__init__(f"{SECTION}.{key}: {shown} {problem}; {fix} (in {source})")
        self.key = key
        self.value = value
        self.source = source


@dataclass(frozen=True)
class QemuConfig:
    """QEMU settings. Field names and defaults follow Kata's ``[hypervisor.qemu]``."""

    path: str = "/usr/bin/qemu-system-x86_64"
    kernel: str = "/usr/share/kata-containers/vmlinuz.container"
    initrd: str = "/usr/share/kata-containers/kata-containers-initrd.img"
    machine_type: str = "q35"
    kernel_params: str = ""
    default_vcpus: int = 1
    #: 0 means "same as default_vcpus" (no CPU hotplug headroom).
    default_maxvcpus: int = 0
    #: MiB.
    default_memory: int = 2048
    accelerator: str = "auto"
    shared_fs: str = "virtio-fs"
    virtio_fs_daemon: str = "/usr/lib/qemu/virtiofsd"
    virtio_fs_cache: str = "auto"
    virtio_fs_extra_args: tuple[str, ...] = ()
    valid_hypervisor_paths: tuple[str, ...] = ()
    enable_annotations: tuple[str, ...] = ()
    #: Keys found in the table that this version does not know (ignored).
    unknown_keys: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_table(
        cls, table: Mapping[str, Any], source: str = "<config>", check_files: bool = True
    ) -> QemuConfig:
        """Parse the ``[hypervisor.qemu]`` table; raise `ConfigError` on the first bad key."""
        known = {f.name for f in fields(cls)} - {"unknown_keys"}
        values: dict[str, Any] = {}
        for key in sorted(known & table.keys()):
            values[key] = _PARSERS[key](key, table[key], source)
        unknown = tuple(sorted(table.keys() - known))
        config = cls(**values, unknown_keys=unknown)
        config._check_relations(source)
        if check_files:
            config.check_files(source)
        return config

    def _check_relations(self, source: str) -> None:
        if self.default_maxvcpus and self.default_maxvcpus < self.default_vcpus:
            raise ConfigError(
                "default_maxvcpus", self.default_maxvcpus,
                f"is below default_vcpus ({self.default_vcpus})",
                "set it to 0 or to at least default_vcpus", source,
            )

    def check_files(self, source: str = "<config>") -> None:
        """Check that the binaries and guest images named here exist."""
        _need_file("path", self.path, "install qemu-system-x86 (make deps)", source, exe=True)
        _need_file("kernel", self.kernel, "run `make guest`", source)
        if self.initrd:
            _need_file("initrd", self.initrd, "run `make guest`", source)
        if self.shared_fs == "virtio-fs":
            _need_file(
                "virtio_fs_daemon", self.virtio_fs_daemon,
                "install qemu-system-x86 (it ships /usr/lib/qemu/virtiofsd)", source, exe=True,
            )


def load_qemu_config(path: Path, check_files: bool = True) -> QemuConfig:
    """Read a configuration.toml and parse its ``[hypervisor.qemu]`` table (may be absent)."""
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"failed to read configuration {path}: {exc}") from exc
    table = doc.get("hypervisor", {}).get("qemu", {})
    return QemuConfig.from_table(table, source=str(path), check_files=check_files)


def _need_file(key: str, value: str, fix: str, source: str, exe: bool = False) -> None:
    if not os.path.isfile(value):
        raise ConfigError(key, value, "does not exist", f"{fix} or fix the path", source)
    if exe and not os.access(value, os.X_OK):
        raise ConfigError(key, value, "is not executable", f"{fix} or fix the path", source)


def _str(key: str, value: object, source: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, "is not a string", "quote the value", source)
    return value


def _abs_path(key: str, value: object, source: str) -> str:
    text = _str(key, value, source)
    if not text.startswith("/"):
        raise ConfigError(key, value, "is not an absolute path", "give a full path", source)
    return text


def _optional_abs_path(key: str, value: object, source: str) -> str:
    return "" if value == "" else _abs_path(key, value, source)


def _nonempty(key: str, value: object, source: str) -> str:
    text = _str(key, value, source)
    if not text.strip():
        raise ConfigError(key, value, "is empty", "set a value such as \"q35\"", source)
    return text


def _int_at_least(minimum: int) -> Callable[[str, object, str], int]:
    def parse(key: str, value: object, source: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "is not an integer", "write a plain number", source)
        if value < minimum:
            raise ConfigError(key, value, f"is below {minimum}", f"use {minimum} or more", source)
        return value

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object, str], str]:
    def parse(key: str, value: object, source: str) -> str:
        if value not in choices:
            wanted = ", ".join(f'"{c}"' for c in choices)
            raise ConfigError(key, value, "is not a valid choice", f"use one of {wanted}", source)
        return str(value)

    return parse


def _str_list(key: str, value: object, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, value, "is not a list of strings", 'write ["a", "b"]', source)
    return tuple(value)


_PARSERS: dict[str, Callable[[str, object, str], Any]] = {
    "path": _abs_path,
    "kernel": _abs_path,
    "initrd": _optional_abs_path,
    "machine_type": _nonempty,
    "kernel_params": _str,
    "default_vcpus": _int_at_least(1),
    "default_maxvcpus": _int_at_least(0),
    "default_memory": _int_at_least(MIN_MEMORY_MIB),
    "accelerator": _one_of(ACCELERATORS),
    "shared_fs": _one_of(SHARED_FS_KINDS),
    "virtio_fs_daemon": _abs_path,
    "virtio_fs_cache": _one_of(VIRTIO_FS_CACHE_MODES),
    "virtio_fs_extra_args": _str_list,
    "valid_hypervisor_paths": _str_list,
    "enable_annotations": _str_list,
}
