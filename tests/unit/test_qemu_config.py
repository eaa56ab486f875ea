"""QemuConfig parsing and validation errors; choosing the hypervisor by its section."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from hypervisors.config import ConfigError
from hypervisors.factory import driver, known_drivers, parse_hypervisor
from hypervisors.qemu.config import QemuConfig

REPO = Path(__file__).resolve().parents[2]


def test_defaults_from_empty_table() -> None:
    config = QemuConfig.from_table({})
    assert config == QemuConfig()
    assert config.machine_type == "q35"
    assert config.accelerator == "auto"
    assert config.unknown_keys == ()


def test_repo_configuration_parses() -> None:
    doc = tomllib.loads((REPO / "configuration.toml").read_text())
    config = QemuConfig.from_table(doc["hypervisor"]["qemu"])
    assert config.default_memory == 2048
    # Pages kept across opens, changes noticed within a second (tests/e2e/test_volumes.py).
    assert (config.virtio_fs_cache, config.virtio_fs_extra_args) == ("always",
                                                                      ("-o", "timeout=1"))
    assert config.unknown_keys == () and config.unsupported_keys == ()


def test_unknown_keys_are_listed_not_fatal() -> None:
    config = QemuConfig.from_table({"bogus": 1, "default_vcpus": 2, "zz": "x"})
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
        QemuConfig.from_table({key: value}, source="/etc/x.toml")
    message = str(info.value)
    assert message.startswith(f"hypervisor.qemu.{key}: ")
    assert words in message
    assert "/etc/x.toml" in message
    assert info.value.key == key


def test_maxvcpus_below_vcpus() -> None:
    with pytest.raises(ConfigError, match="default_maxvcpus: 1 is below default_vcpus"):
        QemuConfig.from_table({"default_vcpus": 2, "default_maxvcpus": 1})


def test_missing_kernel_says_make_guest(tmp_path: Path) -> None:
    table = {"kernel": "/x/vmlinuz", "initrd": "", "path": "/bin/true"}
    with pytest.raises(ConfigError) as info:
        QemuConfig.from_table(table, source="/etc/k.toml").check_files("/etc/k.toml")
    assert str(info.value) == (
        "hypervisor.qemu.kernel: /x/vmlinuz does not exist; run `make guest` or fix the path "
        "(in /etc/k.toml)"
    )


def test_check_files_accepts_existing(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"kernel": str(kernel), "initrd": "", "path": "/bin/true", "shared_fs": "none"}
    config = QemuConfig.from_table(table)
    config.check_files()
    assert config.kernel == str(kernel)


def test_non_executable_daemon(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"kernel": str(kernel), "initrd": "", "path": "/bin/true",
             "virtio_fs_daemon": str(kernel)}
    with pytest.raises(ConfigError, match=r"virtio_fs_daemon: .* is not executable"):
        QemuConfig.from_table(table).check_files()


def test_annotation_keys_are_supported_now() -> None:
    config = QemuConfig.from_table({"enable_annotations": ["kernel_params"],
                                    "valid_hypervisor_paths": ["/usr/bin/*"]})
    assert config.unsupported_keys == ()
    assert config.enable_annotations == ("kernel_params",)


def test_the_section_names_the_driver() -> None:
    assert "qemu" in known_drivers() and "vsock" not in known_drivers()  # a helper package
    config = parse_hypervisor({"qemu": {"default_vcpus": 2}}, "/etc/c.toml")
    assert isinstance(config, QemuConfig) and config.default_vcpus == 2
    assert config.name == "qemu" and driver("qemu").name == "qemu"


@pytest.mark.parametrize(
    ("tables", "words"),
    [
        ({}, "'none' is not exactly one section"),
        ({"qemu": {}, "stratovirt": {}}, "is not exactly one section"),
        ({"firecracker": {}}, "is not a hypervisor this runtime knows; use one of"),
        ({"../qemu": {}}, "is not a hypervisor this runtime knows"),
        ({"qemu": 3}, "is not a table"),
    ],
)
def test_bad_hypervisor_sections(tables: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_hypervisor(tables, "/etc/c.toml")
    assert "/etc/c.toml" in str(info.value)


def test_only_a_vm_sized_for_a_pod_reserves_memory_hot_plug_headroom(tmp_path: Path) -> None:
    from hypervisors.base import VmSpec
    from hypervisors.qemu.vm import Qemu

    config = QemuConfig(default_maxmemory=4096, memory_slots=10)
    assert Qemu(config, VmSpec("a", tmp_path)).max_memory_mib() == 0
    assert Qemu(config, VmSpec("b", tmp_path, memory_mib=768)).max_memory_mib() == 4096
    off = QemuConfig(default_maxmemory=4096, memory_slots=0)
    assert Qemu(off, VmSpec("c", tmp_path, memory_mib=768)).max_memory_mib() == 0


def test_lever_keys_default_to_qemus_behaviour_and_parse() -> None:
    config = QemuConfig.from_table({})
    assert (config.firmware, config.reclaim_guest_freed_memory) == ("", False)
    config = QemuConfig.from_table({"firmware": "/usr/share/qemu/qboot.rom",
                                    "tcg_tb_size_mib": 64,
                                    "reclaim_guest_freed_memory": True})
    assert config.firmware == "/usr/share/qemu/qboot.rom"
    assert config.tcg_tb_size_mib == 64 and config.reclaim_guest_freed_memory is True
    assert QemuConfig.from_table({"tcg_tb_size_mib": 0}).tcg_tb_size_mib == 0


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("firmware", "qboot.rom", "is not an absolute path"),
        ("tcg_tb_size_mib", -1, "is below 0"),
        ("tcg_tb_size_mib", "32", "is not an integer"),
        ("reclaim_guest_freed_memory", "yes", "is not a boolean"),
        ("cpu_features", "pmu=off,-erms -device foo", "'-erms -device foo'.* not a CPU prop"),
        ("cpu_features", "pmu=off,,-la57", "has '', which is not a CPU property"),
        ("cpu_features", "a=b=c", "not a CPU property"),
        ("cpu_features", 3, "is not a string"),
    ],
)
def test_bad_lever_values(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        QemuConfig.from_table({key: value})


def test_cpu_features_are_qemu_cpu_properties() -> None:
    assert QemuConfig.from_table({}).cpu_features == ""
    features = " pmu=off,-la57,+avx2,l3-cache=on,tsc.x=1 "
    assert QemuConfig.from_table({"cpu_features": features}).cpu_features == features.strip()


def test_missing_firmware_is_reported(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    table = {"kernel": str(kernel), "initrd": "", "path": "/bin/true", "shared_fs": "none",
             "firmware": str(tmp_path / "qboot.rom")}
    with pytest.raises(ConfigError, match=r"firmware: .*qboot.rom does not exist"):
        QemuConfig.from_table(table).check_files()
    (tmp_path / "qboot.rom").write_bytes(b"f")
    QemuConfig.from_table(table).check_files()


def test_firmware_from_a_pod_must_be_a_valid_path() -> None:
    from hypervisors.annotations import PREFIX, AnnotationError

    config = QemuConfig.from_table({"enable_annotations": ["firmware"],
                                    "valid_hypervisor_paths": ["/usr/share/qemu/*"]})
    ok = config.with_annotations({PREFIX + "firmware": "/usr/share/qemu/qboot.rom"}, "c")
    assert ok.firmware == "/usr/share/qemu/qboot.rom"
    with pytest.raises(AnnotationError, match="valid_hypervisor_paths"):
        config.with_annotations({PREFIX + "firmware": "/tmp/evil.rom"}, "c")


def test_the_root_image_needs_pci_and_its_loader(tmp_path: Path) -> None:
    ok = QemuConfig.from_table({"image": "/k/rootfs.img", "initrd": "/k/loader.img"})
    assert (ok.image, ok.initrd) == ("/k/rootfs.img", "/k/loader.img")
    with pytest.raises(ConfigError, match=r"image: /k/rootfs.img needs PCI .*microvm.* "
                                          r"set image = \"\""):
        QemuConfig.from_table({"image": "/k/rootfs.img", "machine_type": "microvm"})
    with pytest.raises(ConfigError, match=r"initrd is empty; set initrd to the image.s loader"):
        QemuConfig.from_table({"image": "/k/rootfs.img", "initrd": ""})
    with pytest.raises(ConfigError, match=r"image: 'rootfs\.img' is not an absolute path"):
        QemuConfig.from_table({"image": "rootfs.img"})


def test_a_missing_root_image_says_make_guest(tmp_path: Path) -> None:
    for name in ("vmlinuz", "loader.img"):
        (tmp_path / name).write_bytes(b"x")
    table = {"kernel": str(tmp_path / "vmlinuz"), "initrd": str(tmp_path / "loader.img"),
             "image": str(tmp_path / "rootfs.img"), "path": "/bin/true", "shared_fs": "none"}
    with pytest.raises(ConfigError, match=r"image: .*rootfs.img does not exist; run `make "
                                          r"guest`"):
        QemuConfig.from_table(table).check_files()
    (tmp_path / "rootfs.img").write_bytes(b"i")
    with pytest.raises(ConfigError, match=r"image: .*rootfs.img is 1 bytes, not a multiple of "
                                          r"128 MiB .*truncate -s %128M"):
        QemuConfig.from_table(table).check_files()
    os.truncate(tmp_path / "rootfs.img", 256 << 20)
    QemuConfig.from_table(table).check_files()


def test_annotations_cannot_move_the_root_image_off_pci_or_outside_valid_paths() -> None:
    from hypervisors.annotations import PREFIX, AnnotationError

    config = QemuConfig.from_table({
        "image": "/k/rootfs.img", "initrd": "/k/loader.img",
        "enable_annotations": ["machine_type", "image"], "valid_hypervisor_paths": ["/k/*"]})
    with pytest.raises(AnnotationError, match="needs PCI"):
        config.with_annotations({PREFIX + "machine_type": "microvm"}, "c")
    assert config.with_annotations({PREFIX + "image": "/k/other.img"}, "c").image == \
        "/k/other.img"
    with pytest.raises(AnnotationError, match="valid_hypervisor_paths"):
        config.with_annotations({PREFIX + "image": "/tmp/evil.img"}, "c")
