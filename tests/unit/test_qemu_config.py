"""QemuConfig parsing and validation errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hypervisors.config import ConfigError, QemuConfig, load_qemu_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_from_empty_table() -> None:
    config = QemuConfig.from_table({}, check_files=False)
    assert config == QemuConfig()
    assert config.machine_type == "q35"
    assert config.accelerator == "auto"
    assert config.unknown_keys == ()


def test_repo_configuration_parses() -> None:
    doc = tomllib.loads((REPO / "configuration.toml").read_text())
    config = QemuConfig.from_table(doc["hypervisor"]["qemu"], check_files=False)
    assert config.default_memory == 2048
    assert config.valid_hypervisor_paths == ("/usr/bin/qemu-system-x86_64",)
    assert config.virtio_fs_extra_args == ()


def test_unknown_keys_are_listed_not_fatal() -> None:
    config = QemuConfig.from_table({"bogus": 1, "default_vcpus": 2, "zz": "x"}, check_files=False)
    assert config.default_vcpus == 2
    assert config.unknown_keys == ("bogus", "zz")


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("default_vcpus", 0, "is below 1"),
        ("default_vcpus", "2", "is not an integer"),
        ("default_vcpus", True, "is not an integer"),
        ("default_memory", 16, "is below 64"),
        ("accelerator", "hvf", 'use one of "auto", "kvm", "tcg"'),
        ("shared_fs", "nfs", 'use one of "virtio-fs", "virtio-9p", "none"'),
        ("virtio_fs_cache", "sometimes", "is not a valid choice"),
        ("kernel", "vmlinuz", "is not an absolute path"),
        ("path", 5, "is not a string"),
        ("virtio_fs_extra_args", "-o x", "is not a list of strings"),
        ("machine_type", " ", "is empty"),
    ],
)
def test_bad_values_name_key_value_and_fix(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        QemuConfig.from_table({key: value}, source="/etc/x.toml", check_files=False)
    message = str(info.value)
    assert message.startswith(f"hypervisor.qemu.{key}: ")
    assert words in message
    assert "/etc/x.toml" in message
    assert info.value.key == key


def test_maxvcpus_below_vcpus() -> None:
    with pytest.raises(ConfigError, match="default_maxvcpus: 1 is below default_vcpus"):
        QemuConfig.from_table({"default_vcpus": 2, "default_maxvcpus": 1}, check_files=False)


def test_missing_kernel_says_make_guest(tmp_path: Path) -> None:
    table = {"kernel": "/x/vmlinuz", "initrd": "", "path": "/bin/true"}
    with pytest.raises(ConfigError) as info:
        QemuConfig.from_table(table, source="/etc/k.toml")
    assert str(info.value) == (
        "hypervisor.qemu.kernel: /x/vmlinuz does not exist; run `make guest` or fix the path "
        "(in /etc/k.toml)"
    )


def test_check_files_accepts_existing(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"kernel": str(kernel), "initrd": "", "path": "/bin/true", "shared_fs": "none"}
    assert QemuConfig.from_table(table).kernel == str(kernel)


def test_non_executable_daemon(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"kernel": str(kernel), "initrd": "", "path": "/bin/true",
             "virtio_fs_daemon": str(kernel)}
    with pytest.raises(ConfigError, match=r"virtio_fs_daemon: .* is not executable"):
        QemuConfig.from_table(table)


def test_load_file_without_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[runtime]\nenable_debug = true\n")
    assert load_qemu_config(path, check_files=False) == QemuConfig()


def test_load_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[hypervisor.qemu\n")
    with pytest.raises(ValueError, match="failed to read configuration"):
        load_qemu_config(path)
