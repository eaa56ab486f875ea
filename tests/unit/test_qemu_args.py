"""QEMU argv built from QemuConfig + VmParams (pure)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.constants import (
    CRUN_NO_ASLR_KERNEL_PARAM,
    GATHER_OUTPUT_KERNEL_PARAM,
    SCHED_THROUGHPUT_KERNEL_PARAM,
)
from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice
from hypervisors.qemu.args import (
    AgentChannel,
    Memory,
    Smp,
    VmParams,
    build_argv,
)
from hypervisors.qemu.config import QemuConfig
from hypervisors.statepaths import StatePaths

STATE = Path("/run/kata-py/sbs/sb1")
VIRTIOFS = SharedFsDevice(STATE / "shared", "virtio-fs", "kataShared")
CONFIG = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512,
                    kernel_params="quiet loglevel=3")


def vm(**kw: object) -> VmParams:
    base: dict[str, object] = {"sandbox_id": "sb1", "paths": StatePaths(STATE),
                               "accelerator": "tcg", "shared_fs": VIRTIOFS}
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
        "-append", ("console=ttyS0 panic=1 swiotlb=noforce agent.crun_no_aslr "
                    "agent.gather_output agent.sched_throughput init_on_alloc=0 quiet "
                    "loglevel=3 agent.debug=1"),
        "-nographic", "-nodefaults", "-no-user-config", "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-chardev", f"socket,id=console,path={STATE}/console.sock,server=off",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={STATE}/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-pidfile", f"{STATE}/vmm.pid",
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


@pytest.mark.parametrize(("accel", "model"), [("tcg", "max"), ("kvm", "host")])
def test_cpu_features_follow_the_model(accel: str, model: str) -> None:
    config = dataclasses.replace(CONFIG, cpu_features="pmu=off,-la57")
    assert option(build_argv(config, vm(accelerator=accel)), "-cpu") == [f"{model},pmu=off,-la57"]


def test_vsock_channel() -> None:
    argv = build_argv(CONFIG, vm(agent_channel=AgentChannel.VSOCK, guest_cid=42))
    assert option(argv, "-device")[0] == "vhost-vsock-pci,id=vsock0,guest-cid=42"
    assert not any("agent.sock" in a for a in argv)


def test_vsock_without_cid_is_an_error() -> None:
    with pytest.raises(ValueError, match="guest cid"):
        build_argv(CONFIG, vm(agent_channel=AgentChannel.VSOCK))


def test_9p_share() -> None:
    config = QemuConfig(kernel="/k", initrd="", shared_fs="virtio-9p")
    argv = build_argv(config, vm(shared_fs=SharedFsDevice(Path("/srv/shared"), "virtio-9p", "t")))
    assert option(argv, "-fsdev") == ["local,id=fs9p,path=/srv/shared,security_model=none"]
    assert "virtio-9p-pci,fsdev=fs9p,mount_tag=t" in option(argv, "-device")
    assert "-object" not in argv  # no shared memory needed without vhost-user
    assert "-initrd" not in argv


def test_no_share() -> None:
    argv = build_argv(QemuConfig(shared_fs="none"), vm(shared_fs=None))
    assert not any("vfs" in a or "9p" in a for a in argv)
    assert option(argv, "-m") == ["2048M"]


@pytest.mark.parametrize(("vcpus", "maxv", "want"), [(1, 0, ["-smp", "1"]), (2, 2, ["-smp", "2"]),
                                                    (1, 4, ["-smp", "1,maxcpus=4"])])
def test_smp(vcpus: int, maxv: int, want: list[str]) -> None:
    assert Smp(vcpus, maxv).to_argv() == want


def test_memory_unshared() -> None:
    assert Memory(256, shared=False).to_argv() == ["-m", "256M"]


def test_memory_with_hot_plug_headroom() -> None:
    argv = Memory(512, shared=True, slots=10, max_mib=4096).to_argv()
    assert argv[:2] == ["-m", "512M,slots=10,maxmem=4096M"]
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in argv
    assert Memory(512, shared=False, slots=0, max_mib=4096).to_argv() == ["-m", "512M"]


def test_machine_type_from_config() -> None:
    argv = build_argv(QemuConfig(machine_type="pc", shared_fs="none"), vm(shared_fs=None))
    assert option(argv, "-machine") == ["pc,accel=tcg"]


def test_cold_plugged_nics_use_the_inherited_tap_fds() -> None:
    one = NetworkDevice("eth0", "02:00:00:00:00:01", 1450, (7,))
    multi = NetworkDevice("eth1", "02:00:00:00:00:02", 1500, (8, 9))
    argv = build_argv(CONFIG, vm(networks=(one, multi)))
    assert option(argv, "-netdev") == ["tap,id=netdev-eth0,fd=7", "tap,id=netdev-eth1,fds=8:9"]
    nics = [d for d in option(argv, "-device") if d.startswith("virtio-net-pci")]
    assert nics == [
        "virtio-net-pci,netdev=netdev-eth0,id=eth0,mac=02:00:00:00:00:01,host_mtu=1450",
        "virtio-net-pci,netdev=netdev-eth1,id=eth1,mac=02:00:00:00:00:02,host_mtu=1500,"
        "mq=on,vectors=6",
    ]


def test_cold_plugged_disks() -> None:
    argv = build_argv(CONFIG, vm(blocks=(BlockDevice("d0", Path("/var/img.raw"), True),
                                         BlockDevice("d1", Path("/dev/dm-3")))))
    assert option(argv, "-blockdev") == [
        "driver=file,node-name=drive-d0,filename=/var/img.raw,read-only=on",
        "driver=host_device,node-name=drive-d1,filename=/dev/dm-3,read-only=off",
    ]
    assert "virtio-blk-pci,drive=drive-d1,id=d1" in option(argv, "-device")


def test_vm_spec_overrides_size() -> None:
    argv = build_argv(CONFIG, vm(vcpus=3, memory_mib=1024))
    assert option(argv, "-smp") == ["3"] and option(argv, "-m") == ["1024M"]


def test_seccomp_sandbox_is_on_unless_emptied() -> None:
    argv = build_argv(CONFIG, vm())
    assert option(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert "-sandbox" not in build_argv(QemuConfig(seccompsandbox=""), vm())


MICROVM = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512,
                     machine_type="microvm", default_maxvcpus=4, memory_slots=10)


def test_microvm_has_mmio_devices_no_pci_no_numa_and_no_hotplug_headroom() -> None:
    nic = NetworkDevice("eth0", "02:00:00:00:00:01", 1500, (7, 8))
    disk = BlockDevice("d0", Path("/dev/sdz"))
    argv = build_argv(MICROVM, vm(vcpus=2, max_memory_mib=4096, networks=(nic,),
                                  blocks=(disk,), host_tsc_khz=2000000))
    machine = option(argv, "-machine")
    assert machine == ["microvm,accel=tcg,pcie=off,x-option-roms=off,pit=on,pic=on,"
                       "memory-backend=mem"]
    assert option(argv, "-global") == ["virtio-mmio.force-legacy=false"]
    drivers = [d.split(",")[0] for d in option(argv, "-device")]
    assert drivers == ["virtio-serial-device", "virtserialport", "vhost-user-fs-device",
                       "virtio-net-device", "virtio-blk-device"]
    assert "-numa" not in argv
    assert option(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert option(argv, "-smp") == ["2"] and option(argv, "-m") == ["512M"]
    nic_arg = next(d for d in option(argv, "-device") if d.startswith("virtio-net-device"))
    assert nic_arg.endswith(",mq=on") and "vectors" not in nic_arg
    # Under TCG the guest is told the TSC rate: it has nothing to calibrate it against.
    assert option(argv, "-append")[0].startswith(
        "console=ttyS0 panic=1 swiotlb=noforce tsc_early_khz=2000000")


def test_microvm_under_kvm_keeps_qemus_timer_defaults_and_no_tsc_hint() -> None:
    argv = build_argv(MICROVM, vm(accelerator="kvm", shared_fs=None, host_tsc_khz=2000000))
    assert option(argv, "-machine") == ["microvm,accel=kvm,pcie=off,x-option-roms=off"]
    assert "tsc_early_khz" not in option(argv, "-append")[0]
    assert "-object" not in argv


def test_crun_keeps_its_randomised_layout_under_kvm_only() -> None:
    """Under TCG the agent is told to start crun at fixed addresses (QEMU then reuses its
    translated code); under KVM that gains nothing, and the parameter is left out."""
    assert CRUN_NO_ASLR_KERNEL_PARAM not in option(
        build_argv(CONFIG, vm(accelerator="kvm")), "-append")[0].split()
    for machine in (CONFIG, MICROVM):
        assert CRUN_NO_ASLR_KERNEL_PARAM in option(
            build_argv(machine, vm(accelerator="tcg")), "-append")[0].split()


def test_the_agent_gathers_output_under_tcg_only() -> None:
    """Under TCG each answer costs the guest ~1 ms, so the agent answers output in full
    flow in larger pieces; under KVM it answers at once."""
    assert GATHER_OUTPUT_KERNEL_PARAM not in option(
        build_argv(CONFIG, vm(accelerator="kvm")), "-append")[0].split()
    for machine in (CONFIG, MICROVM):
        assert GATHER_OUTPUT_KERNEL_PARAM in option(
            build_argv(machine, vm(accelerator="tcg")), "-append")[0].split()


def test_the_guest_scheduler_preempts_less_eagerly_under_tcg_only() -> None:
    """Under TCG every context switch is emulated, so the agent widens the guest's wake-up
    granularity (agent/init.py `tune_wakeups`); under KVM the kernel keeps its own."""
    assert SCHED_THROUGHPUT_KERNEL_PARAM not in option(
        build_argv(CONFIG, vm(accelerator="kvm")), "-append")[0].split()
    for machine in (CONFIG, MICROVM):
        assert SCHED_THROUGHPUT_KERNEL_PARAM in option(
            build_argv(machine, vm(accelerator="tcg")), "-append")[0].split()


def test_the_guest_zeroes_its_allocations_unless_under_tcg() -> None:
    """Under TCG the kernel is told not to zero what it allocates (emulated zeroing costs
    an exec ~35 % here); under KVM the hardening stays, and the configured parameters come
    after ours, so an operator's `init_on_alloc=1` wins."""
    kvm = option(build_argv(CONFIG, vm(accelerator="kvm")), "-append")[0].split()
    assert not any(w.startswith("init_on_alloc") for w in kvm)
    for machine in (CONFIG, MICROVM):
        tcg = option(build_argv(machine, vm(accelerator="tcg")), "-append")[0].split()
        assert "init_on_alloc=0" in tcg
    back_on = dataclasses.replace(CONFIG, kernel_params="quiet init_on_alloc=1")
    words = option(build_argv(back_on, vm(accelerator="tcg")), "-append")[0].split()
    assert words.index("init_on_alloc=1") > words.index("init_on_alloc=0")


def test_vsock_and_9p_on_microvm_are_mmio_too() -> None:
    argv = build_argv(MICROVM, vm(agent_channel=AgentChannel.VSOCK, guest_cid=9,
                                  shared_fs=SharedFsDevice(STATE, "virtio-9p", "kataShared")))
    drivers = [d.split(",")[0] for d in option(argv, "-device")]
    assert drivers == ["vhost-vsock-device", "virtio-9p-device"]


def test_tcg_translation_cache_bounded_with_accel_option() -> None:
    argv = build_argv(dataclasses.replace(CONFIG, tcg_tb_size_mib=32), vm())
    # QEMU refuses "-machine accel=" together with "-accel": the accelerator moves.
    assert option(argv, "-machine") == ["q35"]
    assert option(argv, "-accel") == ["tcg,tb-size=32"]


def test_tcg_translation_cache_size_is_ignored_under_kvm() -> None:
    argv = build_argv(dataclasses.replace(CONFIG, tcg_tb_size_mib=32), vm(accelerator="kvm"))
    assert option(argv, "-machine") == ["q35,accel=kvm"]
    assert "-accel" not in argv


def test_tcg_translation_cache_on_microvm_keeps_its_options() -> None:
    argv = build_argv(dataclasses.replace(MICROVM, tcg_tb_size_mib=64), vm())
    assert option(argv, "-machine") == ["microvm,pcie=off,x-option-roms=off,pit=on,pic=on,"
                                        "memory-backend=mem"]
    assert option(argv, "-accel") == ["tcg,tb-size=64"]


def test_no_translation_cache_option_by_default() -> None:
    assert "-accel" not in build_argv(CONFIG, vm())


def test_firmware_is_bios_and_absent_by_default() -> None:
    assert "-bios" not in build_argv(CONFIG, vm())
    argv = build_argv(dataclasses.replace(CONFIG, firmware="/usr/share/qemu/qboot.rom"), vm())
    assert option(argv, "-bios") == ["/usr/share/qemu/qboot.rom"]
    assert argv.index("-bios") < argv.index("-kernel")


@pytest.mark.parametrize(("config", "driver"), [(CONFIG, "virtio-balloon-pci"),
                                                (MICROVM, "virtio-balloon-device")])
def test_reclaim_guest_freed_memory_adds_a_reporting_balloon(config: QemuConfig,
                                                             driver: str) -> None:
    assert not any("balloon" in d for d in option(build_argv(config, vm()), "-device"))
    on = dataclasses.replace(config, reclaim_guest_freed_memory=True)
    devices = option(build_argv(on, vm()), "-device")
    # Last: the devices before it keep their PCI slots.
    assert devices[-1] == f"{driver},id=balloon0,free-page-reporting=on"


IMAGE_CONFIG = dataclasses.replace(CONFIG, image="/k/rootfs.img", initrd="/k/loader.img")
IMAGE_BYTES = 34 * 2**20 + 1  # not a whole MiB: the slot is rounded up


def test_the_root_image_is_a_read_only_shared_pmem_device_in_its_own_slot() -> None:
    argv = build_argv(IMAGE_CONFIG, vm(image_bytes=IMAGE_BYTES))
    assert (f"memory-backend-file,id=rootimg,mem-path=/k/rootfs.img,size={IMAGE_BYTES},"
            "share=on,readonly=on") in option(argv, "-object")
    assert "virtio-pmem-pci,memdev=rootimg,id=rootimg0" in option(argv, "-device")
    # One memory-device slot and room for the image (35 MiB) beside the RAM.
    assert option(argv, "-m") == ["512M,slots=1,maxmem=547M"]
    assert option(argv, "-initrd") == ["/k/loader.img"]


def test_the_root_image_keeps_room_for_memory_hot_plug() -> None:
    hot = dataclasses.replace(IMAGE_CONFIG, memory_slots=2)
    argv = build_argv(hot, vm(image_bytes=IMAGE_BYTES, max_memory_mib=4096))
    assert option(argv, "-m") == ["512M,slots=3,maxmem=4131M"]
    # A VM that may not grow still gets the image's slot.
    assert option(build_argv(hot, vm(image_bytes=2**20)), "-m") == ["512M,slots=1,maxmem=513M"]


def test_no_root_image_no_pmem_and_its_size_must_be_known() -> None:
    argv = build_argv(CONFIG, vm())
    assert not any("pmem" in a for a in argv) and option(argv, "-m") == ["512M"]
    with pytest.raises(ValueError, match="root image's size is unknown"):
        build_argv(IMAGE_CONFIG, vm())


def test_the_guest_gets_no_bounce_buffer() -> None:
    """Hot-plug headroom or the image's slot puts memory above 4 GiB, where the kernel
    would zero a 64 MiB bounce buffer no virtio device of ours uses."""
    for config, params in ((CONFIG, vm()), (IMAGE_CONFIG, vm(image_bytes=IMAGE_BYTES)),
                           (MICROVM, vm())):
        assert "swiotlb=noforce" in option(build_argv(config, params), "-append")[0].split()


def test_a_comma_in_the_image_path_cannot_add_options() -> None:
    config = dataclasses.replace(IMAGE_CONFIG, image="/k/a,share=off.img")
    argv = build_argv(config, vm(image_bytes=2**27))
    assert ("memory-backend-file,id=rootimg,mem-path=/k/a,,share=off.img,size=134217728,"
            "share=on,readonly=on") in option(argv, "-object")
