"""StratovirtConfig: parsing, the keys reported as unsupported, file checks naming key, path
and file; the shipped configuration-stratovirt.toml loads through the project's loader."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hypervisors.annotations import AnnotationError
from hypervisors.base import HypervisorConfig
from hypervisors.config import ConfigError
from hypervisors.factory import driver, known_drivers, parse_hypervisor
from hypervisors.stratovirt.config import StratovirtConfig
from sandbox.config import load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configuration-stratovirt.toml"


def test_defaults_from_empty_table() -> None:
    config = StratovirtConfig.from_table({})
    assert config == StratovirtConfig()
    assert config.machine_type == "microvm" and config.path == "/usr/bin/stratovirt"
    assert config.accelerator == "kvm" and config.use_vsock
    assert config.unknown_keys == () and config.unsupported_keys == ()


def test_it_is_a_hypervisor_config_found_by_its_section() -> None:
    assert "stratovirt" in known_drivers()
    config = parse_hypervisor({"stratovirt": {"default_vcpus": 2}}, "/etc/c.toml")
    assert isinstance(config, StratovirtConfig) and config.default_vcpus == 2
    checked: HypervisorConfig = config  # the protocol, statically
    assert checked.name == "stratovirt" and driver("stratovirt").name == "stratovirt"
    assert config.settings()["virtio_fs_extra_args"] == []


def test_unknown_keys_are_listed_not_fatal() -> None:
    config = StratovirtConfig.from_table({"bogus": 1, "default_vcpus": 2, "rootfs_type": "x"})
    assert config.unknown_keys == ("bogus", "rootfs_type")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("image", "/usr/share/kata-containers/kata-containers.img"),
        ("sandbox_cgroup_with_emulator", True),
        ("disable_new_netns", True),
        ("disable_vhost_net", False),
        ("memory_slots", 10),
        ("allow_tcg", True),
    ],
)
def test_keys_parsed_but_not_acted_on_are_reported(key: str, value: object) -> None:
    assert StratovirtConfig.from_table({key: value}).unsupported_keys == (key,)


def test_keys_at_values_needing_nothing_are_not_reported() -> None:
    table = {"image": "", "sandbox_cgroup_with_emulator": False, "disable_new_netns": False,
             "disable_vhost_net": True, "memory_slots": 0, "disable_block_device_use": True,
             "block_device_driver": "virtio-mmio", "use_vsock": False, "enable_debug": True}
    config = StratovirtConfig.from_table(table)
    assert config.unsupported_keys == () and config.unknown_keys == ()


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("machine_type", "q35", 'use one of "microvm"'),  # the driver builds microvm only
        ("block_device_driver", "virtio-blk", 'use one of "virtio-mmio"'),
        ("accelerator", "tcg", 'use one of "kvm"'),  # config_guidebook.md 1.1: accel kvm
        ("shared_fs", "virtio-9p", 'use one of "virtio-fs", "none"'),
        ("default_memory", 64, "is below 128"),  # config_guidebook.md 1.3.1: [128M, 512G]
        ("default_vcpus", 255, "above StratoVirt's 254"),  # 1.2.1: maximum 254
        ("default_memory", 600 << 10, "above StratoVirt's 524288 MiB"),
        ("use_vsock", "yes", "is not a boolean"),
        ("kernel", "vmlinuz", "is not an absolute path"),
        ("virtio_fs_cache", "sometimes", "is not a valid choice"),
    ],
)
def test_bad_values_name_key_value_and_fix(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        StratovirtConfig.from_table({key: value}, source="/etc/x.toml")
    message = str(info.value)
    assert message.startswith(f"hypervisor.stratovirt.{key}: ")
    assert words in message and "/etc/x.toml" in message


def test_image_without_initrd_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"image: .* boots from an initrd; set initrd"):
        StratovirtConfig.from_table({"image": "/x/rootfs.img", "initrd": ""})


def test_missing_binary_names_key_path_and_file(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"path": "/nonexistent/stratovirt", "kernel": str(kernel), "initrd": "",
             "shared_fs": "none"}
    with pytest.raises(ConfigError) as info:
        StratovirtConfig.from_table(table).check_files("/etc/kata/configuration.toml")
    assert str(info.value) == (
        "hypervisor.stratovirt.path: /nonexistent/stratovirt does not exist; install "
        "StratoVirt (openEuler: dnf install stratovirt) or fix the path "
        "(in /etc/kata/configuration.toml)")
    assert info.value.key == "path"


def test_non_executable_binary_names_key_path_and_file(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"path": str(kernel), "kernel": str(kernel), "initrd": "", "shared_fs": "none"}
    with pytest.raises(ConfigError) as info:
        StratovirtConfig.from_table(table).check_files("/etc/k.toml")
    assert str(info.value).startswith(f"hypervisor.stratovirt.path: {kernel} is not executable")
    assert "(in /etc/k.toml)" in str(info.value)


def test_file_keys_follow_the_share() -> None:
    assert [k for k, _, _ in StratovirtConfig().file_keys()] == [
        "path", "kernel", "initrd", "virtio_fs_daemon"]
    none = StratovirtConfig(shared_fs="none", initrd="")
    assert [k for k, _, _ in none.file_keys()] == ["path", "kernel"]


def test_annotations_apply_where_enabled() -> None:
    config = StratovirtConfig(enable_annotations=("default_vcpus", "kernel_params"))
    applied = config.with_annotations({
        "io.katacontainers.config.hypervisor.default_vcpus": "2",
        "io.katacontainers.config.hypervisor.kernel_params": "quiet"}, "/etc/k.toml")
    assert applied.default_vcpus == 2 and applied.kernel_params == "quiet"
    with pytest.raises(AnnotationError, match="not enabled"):
        StratovirtConfig().with_annotations(
            {"io.katacontainers.config.hypervisor.default_memory": "512"}, "/etc/k.toml")


def test_annotations_cannot_break_the_relations() -> None:
    config = StratovirtConfig(enable_annotations=("default_vcpus",), default_maxvcpus=2)
    with pytest.raises(AnnotationError, match="is below default_vcpus"):
        config.with_annotations({"io.katacontainers.config.hypervisor.default_vcpus": "4"},
                                "/etc/k.toml")


def test_the_shipped_configuration_parses() -> None:
    doc = tomllib.loads(SHIPPED.read_text())
    config = StratovirtConfig.from_table(doc["hypervisor"]["stratovirt"])
    assert config.path == "/usr/bin/stratovirt"
    assert config.unknown_keys == () and config.unsupported_keys == ()
    # The whole initrd, as on QEMU's microvm: neither has PCI for the shared root image.
    microvm = tomllib.loads((REPO / "configuration-qemu-microvm.toml").read_text())
    qemu = microvm["hypervisor"]["qemu"]
    assert config.initrd == qemu["initrd"]
    # The same kernel: StratoVirt's as the bzImage, QEMU's as the ELF it enters by PVH.
    assert (config.kernel, qemu["kernel"]) == ("/usr/share/kata-containers/vmlinuz.container",
                                               "/usr/share/kata-containers/vmlinux.container")


def test_the_shipped_configuration_loads_without_warnings() -> None:
    loaded = load_config(str(SHIPPED))
    assert loaded.hypervisor.name == "stratovirt"
    assert loaded.warnings == ()
    shipped = tomllib.loads(SHIPPED.read_text())
    default = tomllib.loads((REPO / "configuration.toml").read_text())
    assert shipped["agent"] == default["agent"] and shipped["runtime"] == default["runtime"]


def test_unsupported_keys_are_warnings_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "configuration.toml"
    path.write_text("[hypervisor.stratovirt]\nkernel = '/k'\ndisable_new_netns = true\n")
    warnings = "\n".join(load_config(str(path)).warnings)
    assert (f"hypervisor.stratovirt.disable_new_netns in {path}:3 is set but not supported"
            in warnings)
