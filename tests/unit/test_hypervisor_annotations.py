"""Pod annotations that change the hypervisor, honoured only where the configuration says."""

from __future__ import annotations

import dataclasses

import pytest

from hypervisors.annotations import AnnotationError
from hypervisors.qemu.config import QemuConfig

P = "io.katacontainers.config.hypervisor."
SOURCE = "/etc/kata/configuration.toml"


def config(**overrides: object) -> QemuConfig:
    return dataclasses.replace(QemuConfig(), **overrides)  # type: ignore[arg-type]


def test_no_annotations_change_nothing() -> None:
    base = config()
    assert base.with_annotations({"io.kubernetes.cri.sandbox-id": "x"}, SOURCE) is base


def test_enabled_keys_are_parsed_like_the_file() -> None:
    c = config(enable_annotations=("kernel_params", "default_.*", "virtio_fs_extra_args"),
               kernel_params="")
    got = c.with_annotations({P + "kernel_params": "quiet debug", P + "default_vcpus": "2",
                              P + "virtio_fs_extra_args": '["--thread-pool-size=1"]'}, SOURCE)
    assert got.kernel_params == "quiet debug" and got.default_vcpus == 2
    assert got.virtio_fs_extra_args == ("--thread-pool-size=1",)


def test_a_key_not_enabled_is_refused_naming_the_rule() -> None:
    c = config(enable_annotations=("kernel_params",))
    with pytest.raises(AnnotationError, match=rf"annotation {P}default_memory is not enabled: "
                                              r"enable_annotations in \[hypervisor.qemu\] of "
                                              f"{SOURCE}"):
        c.with_annotations({P + "default_memory": "4096"}, SOURCE)


@pytest.mark.parametrize("key", ["enable_annotations", "valid_hypervisor_paths", "allow_tcg",
                                 "seccompsandbox", "no_such_key"])
def test_keys_that_guard_the_host_never_come_from_a_pod(key: str) -> None:
    with pytest.raises(AnnotationError, match="not a hypervisor setting a pod may change"):
        config(enable_annotations=(".*",)).with_annotations({P + key: "true"}, SOURCE)


def test_paths_must_match_valid_hypervisor_paths() -> None:
    c = config(enable_annotations=("path",), valid_hypervisor_paths=("/usr/bin/qemu-*",))
    assert c.with_annotations({P + "path": "/usr/bin/qemu-kvm"}, SOURCE).path == \
        "/usr/bin/qemu-kvm"
    for evil in ("/tmp/qemu", "/usr/bin/../../tmp/qemu-x", "/usr/bin/qemu-x/../../../tmp/x"):
        with pytest.raises(AnnotationError, match=r"not allowed|not a normalised"):
            c.with_annotations({P + "path": evil}, SOURCE)
    empty = config(enable_annotations=("path",))
    with pytest.raises(AnnotationError, match=r"allows nothing \(it is empty\)"):
        empty.with_annotations({P + "path": "/usr/bin/qemu-kvm"}, SOURCE)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("default_vcpus", "two", "not an integer"), ("default_vcpus", "0", "is below 1"),
    ("virtio_fs_extra_args", "--x", "JSON list of strings"),
    ("virtio_fs_cache", "bogus", "bogus"), ("kernel_params", "x" * 5000, "longer than"),
])
def test_bad_values_are_refused_with_the_parsers_reason(key: str, value: str,
                                                       message: str) -> None:
    with pytest.raises(AnnotationError, match=message):
        config(enable_annotations=(".*",)).with_annotations({P + key: value}, SOURCE)


def test_a_broken_pattern_enables_nothing() -> None:
    with pytest.raises(AnnotationError, match="not enabled"):
        config(enable_annotations=("(",)).with_annotations({P + "kernel_params": "x"}, SOURCE)


def test_kernel_params_are_added_to_the_configured_ones() -> None:
    c = config(enable_annotations=("kernel_params",), kernel_params="quiet reboot=k")
    got = c.with_annotations({P + "kernel_params": "debug"}, SOURCE)
    assert got.kernel_params == "quiet reboot=k debug"
