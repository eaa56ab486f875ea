"""QEMU argv built from QemuConfig + VmParams (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisors.config import QemuConfig
from hypervisors.qemu_args import (
    AgentChannel,
    Memory,
    Smp,
    StatePaths,
    VmParams,
    build_argv,
)

STATE = Path("/run/kata-py/sbs/sb1")
CONFIG = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512,
                    kernel_params="quiet loglevel=3")


def vm(**kw: object) -> VmParams:
    base: dict[str, object] = {"sandbox_id": "sb1", "paths": StatePaths(STATE),
                               "accelerator": "tcg"}
    base.update(kw)
    return VmParams(**base)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_typical_virtiofs_serial_tcg() -> None:
    argv = build_argv(CONFIG, vm(extra_kernel_params=("agent.debug=1",)))
    assert argv == [
        "/usr/bin/qemu-system-x86_64",
        "-name", "sandbox-sb1",
        "-machine", "q35,accel=tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", "512M",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa", "node,memdev=mem",
        "-kernel", "/k/vmlinuz",
        "-initrd", "/k/initrd.img",
        "-append", "console=ttyS0 panic=1 quiet loglevel=3 agent.debug=1",
        "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
        "-chardev", f"socket,id=console,path={STATE}/console.sock,server=off",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={STATE}/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", f"{STATE}/qemu.pid",
        "-device", "virtio-serial-pci,id=serial0",
        "-chardev", f"socket,id=agent,path={STATE}/agent.sock,server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent.channel.0",
        "-chardev", f"socket,id=vfs,path={STATE}/virtiofsd.sock",
        "-device", "vhost-user-fs-pci,chardev=vfs,tag=kataShared",
    ]
    assert "-daemonize" not in argv


def test_kvm_uses_host_cpu() -> None:
    argv = build_argv(CONFIG, vm(accelerator="kvm"))
    assert option(argv, "-machine") == ["q35,accel=kvm"]
    assert option(argv, "-cpu") == ["host"]


def test_vsock_channel() -> None:
    argv = build_argv(CONFIG, vm(agent_channel=AgentChannel.VSOCK, guest_cid=42))
    assert option(argv, "-device")[0] == "vhost-vsock-pci,id=vsock0,guest-cid=42"
    assert not any("agent.sock" in a for a in argv)


def test_vsock_without_cid_is_an_error() -> None:
    with pytest.raises(ValueError, match="guest cid"):
        build_argv(CONFIG, vm(agent_channel=AgentChannel.VSOCK))


def test_9p_share() -> None:
    config = QemuConfig(kernel="/k", initrd="", shared_fs="virtio-9p")
    argv = build_argv(config, vm(shared_dir=Path("/srv/shared")))
    assert option(argv, "-fsdev") == ["local,id=fs9p,path=/srv/shared,security_model=none"]
    assert "virtio-9p-pci,fsdev=fs9p,mount_tag=kataShared" in option(argv, "-device")
    assert "-object" not in argv  # no shared memory needed without vhost-user
    assert "-initrd" not in argv
    with pytest.raises(ValueError, match="shared dir"):
        build_argv(config, vm())


def test_no_share() -> None:
    argv = build_argv(QemuConfig(shared_fs="none"), vm())
    assert not any("vfs" in a or "9p" in a for a in argv)
    assert option(argv, "-m") == ["2048M"]


@pytest.mark.parametrize(("vcpus", "maxv", "want"), [(1, 0, ["-smp", "1"]), (2, 2, ["-smp", "2"]),
                                                    (1, 4, ["-smp", "1,maxcpus=4"])])
def test_smp(vcpus: int, maxv: int, want: list[str]) -> None:
    assert Smp(vcpus, maxv).to_argv() == want


def test_memory_unshared() -> None:
    assert Memory(256, shared=False).to_argv() == ["-m", "256M"]


def test_machine_type_from_config() -> None:
    argv = build_argv(QemuConfig(machine_type="pc", shared_fs="none"), vm())
    assert option(argv, "-machine") == ["pc,accel=tcg"]
