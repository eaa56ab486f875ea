"""StratoVirt argv built from StratovirtConfig + VmParams (pure). Each expectation names the
section of StratoVirt's docs/config_guidebook.md (or qmp.md) whose syntax it follows
(openeuler-mirror/stratovirt, master); the fake stratovirt (tests/harness/stratovirt_peer.py)
checks the same grammar independently, and one test feeds it our argv."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from common.constants import AGENT_PORT_NAME
from hypervisors.base import BlockDevice, NetworkDevice, SharedFsDevice
from hypervisors.statepaths import StatePaths
from hypervisors.stratovirt.args import (
    AgentChannel,
    VmParams,
    build_argv,
    stratovirt_params,
)
from hypervisors.stratovirt.config import StratovirtConfig
from tests.harness.stratovirt_peer import ArgvError, FakeVm, pairs

STATE = Path("/run/kata-py/sbs/sb1")
VIRTIOFS = SharedFsDevice(STATE / "shared", "virtio-fs", "kataShared")
CONFIG = StratovirtConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512,
                          kernel_params="quiet")


def vm(**kw: object) -> VmParams:
    base: dict[str, object] = {"sandbox_id": "sb1", "paths": StatePaths(STATE),
                               "shared_fs": VIRTIOFS}
    base.update(kw)
    return VmParams(**base)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_typical_virtiofs_vsock() -> None:
    """The whole line for a pod VM: one expectation per documented group."""
    argv = build_argv(CONFIG, vm(agent_channel=AgentChannel.VSOCK, guest_cid=7,
                                 extra_kernel_params=("agent.debug=1",)))
    assert argv == [
        "/usr/bin/stratovirt",
        "-name", "sandbox-sb1",  # stratovirt --help: -name
        "-machine", "microvm,dump-guest-core=off,mem-share=on",  # 1.1 Machine Config
        "-smp", "1",  # 1.2.1 CPU Number
        "-m", "512M",  # 1.3.1 Memory Size
        "-kernel", "/k/vmlinuz",  # 1.6 Kernel and Kernel Parameters
        "-initrd", "/k/initrd.img",  # 1.7 Initrd Configuration
        "-append", "console=ttyS0 reboot=k panic=1 pci=off quiet agent.debug=1",  # quickstart.md
        "-chardev", f"socket,id=console,path={STATE}/console.sock,server,nowait",  # 2.12
        "-serial", "chardev:console",  # 2.6 Serial
        "-qmp", f"unix:{STATE}/qmp.sock,server,nowait",  # qmp.md QMP Creation
        "-pidfile", f"{STATE}/vmm.pid",  # 1.10 Daemonize
        "-device", "vhost-vsock-device,id=vsock0,guest-cid=7",  # 2.5 Virtio-vsock
        "-chardev", f"socket,id=vfs,path={STATE}/virtiofsd.sock",  # 2.17.1 virtio fs device
        "-device", "vhost-user-fs-device,id=vfs0,chardev=vfs,tag=kataShared",  # 2.17.1
    ]


def test_never_daemonized_but_pidfile_kept() -> None:
    """1.10 Daemonize: -daemonize would take StratoVirt away from the shim; -pidfile stays."""
    argv = build_argv(CONFIG, vm())
    assert "-daemonize" not in argv
    assert option(argv, "-pidfile") == [f"{STATE}/vmm.pid"]


def test_agent_serial_port_named_for_the_agent() -> None:
    """2.4 Virtio-console, "virtio mmio device using generic port": a virtio-serial-device,
    a server,nowait socket chardev and a virtserialport whose id is the name the guest sees;
    nr left out (2.4: "nr = 0 is only allowed for virtconsole")."""
    argv = build_argv(CONFIG, vm(agent_channel=AgentChannel.SERIAL))
    assert option(argv, "-device")[0] == "virtio-serial-device,id=virtio-serial0"
    assert f"socket,id=agent,path={STATE}/agent.sock,server,nowait" in option(argv, "-chardev")
    assert f"virtserialport,id={AGENT_PORT_NAME},chardev=agent" in option(argv, "-device")
    assert not any("vhost-vsock" in d for d in option(argv, "-device"))


def test_no_share_no_shared_memory() -> None:
    """1.1: mem-share only when virtio-fs needs it (StratoVirt refuses vhost-user-fs
    without it)."""
    argv = build_argv(CONFIG, vm(shared_fs=None))
    assert option(argv, "-machine") == ["microvm,dump-guest-core=off"]
    assert not any("vhost-user-fs" in d for d in option(argv, "-device"))


def test_virtio_9p_is_refused() -> None:
    """2.17: StratoVirt shares directories with virtio-fs only."""
    with pytest.raises(ValueError, match="virtio-9p is not supported"):
        stratovirt_params(CONFIG, vm(shared_fs=SharedFsDevice(STATE, "virtio-9p", "t")))


def test_sizes_from_the_vm_then_the_config() -> None:
    """1.2.1 ``-smp [cpus=]n`` (no maxcpus: cpu_hotplug.md is for standard VMs) and 1.3.1
    ``-m <megs>M``."""
    argv = build_argv(CONFIG, vm(vcpus=3, memory_mib=768))
    assert option(argv, "-smp") == ["3"] and option(argv, "-m") == ["768M"]


def test_tap_fds_one_and_several() -> None:
    """2.3 Virtio-net: ``-netdev tap,id=<netdevid>,fd=<N>`` / ``fds=<N>:<M>`` and
    ``-device virtio-net-device,id=<net_id>,netdev=<netdev_id>,mac=<macaddr>``."""
    one = NetworkDevice("eth0", "02:00:00:00:00:01", 1500, (5,))
    two = NetworkDevice("eth1", "02:00:00:00:00:02", 1500, (6, 7))
    argv = build_argv(CONFIG, vm(networks=(one, two)))
    assert option(argv, "-netdev") == ["tap,id=netdev-eth0,fd=5", "tap,id=netdev-eth1,fds=6:7"]
    devices = option(argv, "-device")
    assert "virtio-net-device,id=eth0,netdev=netdev-eth0,mac=02:00:00:00:00:01" in devices
    assert "virtio-net-device,id=eth1,netdev=netdev-eth1,mac=02:00:00:00:00:02" in devices


def test_block_devices() -> None:
    """2.2 Virtio-blk: ``-drive id=..,file=..,readonly={on|off},direct={on|off}`` and
    ``-device virtio-blk-device,drive=<drive_id>,id=<blkid>``; direct=off as tmpfs has no
    O_DIRECT."""
    disks = (BlockDevice("vol0", Path("/dev/loop3")), BlockDevice("ro", Path("/x.img"), True))
    argv = build_argv(CONFIG, vm(blocks=disks))
    assert option(argv, "-drive") == [
        "id=drive-vol0,file=/dev/loop3,readonly=off,direct=off",
        "id=drive-ro,file=/x.img,readonly=on,direct=off",
    ]
    assert "virtio-blk-device,drive=drive-ro,id=ro" in option(argv, "-device")


def test_vsock_needs_a_cid() -> None:
    with pytest.raises(ValueError, match="needs a guest cid"):
        stratovirt_params(CONFIG, vm(agent_channel=AgentChannel.VSOCK))


def test_no_initrd_no_initrd_flag() -> None:
    """1.7: -initrd only when an initrd is configured."""
    argv = build_argv(StratovirtConfig(kernel="/k", initrd=""), vm(shared_fs=None))
    assert "-initrd" not in argv


def test_our_argv_passes_the_fakes_grammar_check(tmp_path: Path) -> None:
    """The fake checks the documented grammar on its own (FakeVm); every option we emit,
    with every device kind, must pass it."""
    kernel, disk = tmp_path / "vmlinuz", tmp_path / "disk.img"
    kernel.write_bytes(b"k")
    disk.write_bytes(b"d")
    config = StratovirtConfig(kernel=str(kernel), initrd="", default_memory=256)
    read, write = os.pipe()
    try:
        nic = NetworkDevice("eth0", "02:00:00:00:00:01", 1500, (read,))
        for channel, cid in ((AgentChannel.SERIAL, None), (AgentChannel.VSOCK, 9)):
            argv = build_argv(config, vm(agent_channel=channel, guest_cid=cid, networks=(nic,),
                                         blocks=(BlockDevice("vol0", disk),)))
            FakeVm(pairs(argv[1:])).check()
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize(("change", "words"), [
    (("-machine", "microvm,mem-share=yes"), "mem-share must be on or off"),
    (("-m", "64M"), "128M to 512G"),
    (("-smp", "255"), "cpus must be 1 to 254"),
    (("-qmp", "unix:/x,server"), "is not unix:<path>,server,nowait"),
    (("-serial", "chardev:nope"), "no chardev 'nope'"),
])  # fmt: skip
def test_the_fake_refuses_what_the_docs_refuse(change: tuple[str, str], words: str) -> None:
    """The grammar check is not a rubber stamp."""
    argv = ["-machine", "microvm", "-kernel", __file__, "-qmp", "unix:/q,server,nowait",
            *change]
    with pytest.raises(ArgvError, match=words):
        FakeVm(pairs(argv)).check()


def test_the_fake_refuses_a_virtserialport_at_nr_0() -> None:
    """2.4: "nr = 0 is only allowed for virtconsole"."""
    argv = ["-machine", "microvm", "-kernel", __file__, "-qmp", "unix:/q,server,nowait",
            "-device", "virtio-serial-device", "-chardev", "socket,id=a,path=/a,server,nowait",
            "-device", "virtserialport,id=p,chardev=a,nr=0"]
    with pytest.raises(ArgvError, match="reserved for virtconsole"):
        FakeVm(pairs(argv)).check()


def test_the_fake_reports_its_version(tmp_path: Path) -> None:
    """``stratovirt -V`` prints "StratoVirt <version>" (what checks.py runs)."""
    from tests.harness.stratovirt_peer import write_fake_stratovirt

    fake = write_fake_stratovirt(tmp_path / "stratovirt")
    done = subprocess.run([str(fake), "-V"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("StratoVirt ")
