"""Guest CIDs for kernel vsock: claimed on our own /dev/vhost-vsock instance, retried on
EADDRINUSE, the instance handed to QEMU as ``vhostfd`` (no real vhost-vsock here: the device
is a file and the ioctl a fake that plays the kernel)."""

from __future__ import annotations

import errno
import os
import random
import struct
from pathlib import Path

import pytest

from hypervisors.accel import AccelChoice
from hypervisors.base import VmSpec, VsockDevice
from hypervisors.errors import HypervisorError
from hypervisors.qemu import vm as qemu_vm
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.vm import Qemu
from hypervisors.vsock import cid as cids


class Kernel:
    """VHOST_VSOCK_SET_GUEST_CID as the kernel answers it: EADDRINUSE for CIDs taken."""

    def __init__(self, taken: set[int], error: int | None = None) -> None:
        self.taken, self.error, self.asked = taken, error, []

    def __call__(self, fd: int, request: int, arg: bytes) -> None:
        assert request == cids.VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60
        (cid,) = struct.unpack("=Q", arg)
        self.asked.append(cid)
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        if cid in self.taken:
            raise OSError(errno.EADDRINUSE, "in use")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def device(tmp_path: Path) -> str:
    path = tmp_path / "vhost-vsock"
    path.write_bytes(b"")
    return str(path)


def test_a_taken_cid_is_skipped_and_the_fd_holds_the_free_one(device: str) -> None:
    twin = random.Random(7)
    picks = [twin.randint(cids.FIRST_CID, cids.LAST_CID) for _ in range(3)]
    kernel = Kernel(taken=set(picks[:2]))  # another sandbox holds the first two picks
    cid, fd = cids.reserve_guest_cid(device, kernel, random.Random(7))
    try:
        assert kernel.asked == picks and cid == picks[2]
        assert os.readlink(f"/proc/self/fd/{fd}") == device
        assert os.get_inheritable(fd) is False  # handed to QEMU only through pass_fds
    finally:
        os.close(fd)


def test_any_other_error_or_no_free_cid_closes_the_instance(device: str) -> None:
    before = open_fds()
    with pytest.raises(HypervisorError, match=r"failed to claim guest CID .* Operation not"):
        cids.reserve_guest_cid(device, Kernel(set(), errno.EPERM), random.Random(1))
    always = Kernel(set())
    always.taken = set(range(cids.FIRST_CID, cids.FIRST_CID + 4))
    rng = random.Random(2)
    rng.randint = lambda a, b: cids.FIRST_CID  # type: ignore[method-assign]
    with pytest.raises(HypervisorError, match=f"in {cids.MAX_TRIES} tries"):
        cids.reserve_guest_cid(device, always, rng)
    assert len(always.asked) == cids.MAX_TRIES
    assert open_fds() == before


def test_a_missing_device_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="modprobe vhost_vsock"):
        cids.reserve_guest_cid(str(tmp_path / "absent"))


def test_qemu_gets_the_instance_as_vhostfd_and_the_shim_closes_its_copy(
        device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_vm, "host_has_vhost_vsock", lambda: True)
    monkeypatch.setattr(qemu_vm, "reserve_guest_cid",
                        lambda: cids.reserve_guest_cid(device, Kernel(set())))
    vm = Qemu(QemuConfig(vsock_backend="kernel"), VmSpec("sb1", tmp_path))
    vm._accel = AccelChoice("tcg", "test")
    vsock = vm._agent_vsock()
    assert vsock is not None and vsock.vhost_fd is not None and not vsock.vhost_user
    vm._devices.add(vsock)
    argv = " ".join(vm.build_argv())
    assert (f"vhost-vsock-pci,id=vsock0,guest-cid={vsock.guest_cid},"
            f"vhostfd={vsock.vhost_fd}") in argv
    assert vm._spawn_fds() == (vsock.vhost_fd,)
    assert vm.agent_address == f"vsock://{vsock.guest_cid}:1024"
    before = open_fds()
    vm._close_vhost_fds()
    assert open_fds() == before - 1
    assert vm._devices.of(VsockDevice)[0].vhost_fd is None and vm._spawn_fds() == ()
    vm._close_vhost_fds()  # idempotent
