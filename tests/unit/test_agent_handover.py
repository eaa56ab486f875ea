"""agent.handover: the clock and RNG hand-over of a VM restored from a template, directly and
through the service over a real ttrpc connection."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from agent.container import Containers, RuntimeConfig
from agent.errors import InvalidArgument
from agent.handover import MAX_EPOCH_SECONDS, MAX_SEED_BYTES, RNDRESEEDCRNG, Handover
from agent.reaper import Reaper
from agent.service import SERVICE, AgentService, StartupInfo
from agent.storage import Storages
from protocols import agent_pb2 as pb
from ttrpc import Client, Code, Server, TtrpcError


class FakeIoctl:
    """Records (path of the fd, request); raises ``err`` if set."""

    def __init__(self, err: int | None = None) -> None:
        self.err = err
        self.calls: list[tuple[str, int]] = []

    def __call__(self, fd: int, request: int) -> object:
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), request))
        if self.err is not None:
            raise OSError(self.err, os.strerror(self.err))
        return 0


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def handover(tmp_path: Path, clock: list[int], ioctl: FakeIoctl) -> Handover:
    device = tmp_path / "random"
    device.touch()
    return Handover(set_clock=clock.append, random_device=str(device), ioctl=ioctl)


# -- the clock ------------------------------------------------------------------------

def test_the_clock_is_set_to_sec_and_usec(tmp_path: Path) -> None:
    clock: list[int] = []
    h = handover(tmp_path, clock, FakeIoctl())
    ahead = int(time.time()) + 3600
    step = h.set_time(ahead, 250_000)
    assert clock == [ahead * 1_000_000_000 + 250_000_000]
    assert 3599 < step / 1e9 < 3601.5  # reported: the clock moved an hour forward


@pytest.mark.parametrize(("sec", "usec", "error"), [
    (-1, 0, "Sec -1 is not a plausible time"),
    (MAX_EPOCH_SECONDS + 1, 0, "is not a plausible time"),
    (1_700_000_000, -1, "Usec -1 is out of range"),
    (1_700_000_000, 1_000_000, "Usec 1000000 is out of range"),
])
def test_an_implausible_time_is_refused(tmp_path: Path, sec: int, usec: int,
                                        error: str) -> None:
    clock: list[int] = []
    with pytest.raises(InvalidArgument, match=error):
        handover(tmp_path, clock, FakeIoctl()).set_time(sec, usec)
    assert clock == []


def test_the_edges_of_the_range_are_accepted(tmp_path: Path) -> None:
    clock: list[int] = []
    h = handover(tmp_path, clock, FakeIoctl())
    h.set_time(0, 0)
    h.set_time(MAX_EPOCH_SECONDS, 999_999)
    assert clock == [0, MAX_EPOCH_SECONDS * 1_000_000_000 + 999_999_000]


# -- the RNG --------------------------------------------------------------------------

def test_reseed_writes_the_bytes_then_reseeds_the_crng_on_that_fd(tmp_path: Path) -> None:
    ioctl, before = FakeIoctl(), open_fds()
    data = bytes(range(64))
    assert handover(tmp_path, [], ioctl).reseed(data) is True
    assert (tmp_path / "random").read_bytes() == data
    assert ioctl.calls == [(str(tmp_path / "random"), RNDRESEEDCRNG)]
    assert RNDRESEEDCRNG == 0x5207  # _IO('R', 0x07)
    assert open_fds() == before


@pytest.mark.parametrize("err", [errno.ENOTTY, errno.EINVAL, errno.ENODATA])
def test_a_kernel_that_cannot_reseed_now_still_gets_the_bytes(tmp_path: Path, err: int,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:  # fmt: skip
    ioctl, before = FakeIoctl(err), open_fds()
    assert handover(tmp_path, [], ioctl).reseed(b"seed") is False
    assert (tmp_path / "random").read_bytes() == b"seed"
    assert len(ioctl.calls) == 1 and open_fds() == before
    assert "no reseed now" in capsys.readouterr().err


def test_other_ioctl_errors_are_raised(tmp_path: Path) -> None:
    before = open_fds()
    with pytest.raises(PermissionError):
        handover(tmp_path, [], FakeIoctl(errno.EPERM)).reseed(b"seed")
    assert open_fds() == before


@pytest.mark.parametrize(("size", "error"), [
    (0, "data is empty"), (MAX_SEED_BYTES + 1, "data is 4097 bytes; the limit is 4096"),
])
def test_reseed_bounds_the_data(tmp_path: Path, size: int, error: str) -> None:
    ioctl = FakeIoctl()
    with pytest.raises(InvalidArgument, match=error):
        handover(tmp_path, [], ioctl).reseed(b"x" * size)
    assert (tmp_path / "random").read_bytes() == b"" and ioctl.calls == []
    handover(tmp_path, [], ioctl).reseed(b"x" * MAX_SEED_BYTES)  # the limit itself is fine
    assert len((tmp_path / "random").read_bytes()) == MAX_SEED_BYTES


def test_reseed_never_follows_a_link(tmp_path: Path) -> None:
    (tmp_path / "target").touch()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    h = Handover(set_clock=lambda ns: None, random_device=str(tmp_path / "link"),
                 ioctl=FakeIoctl())
    with pytest.raises(OSError) as info:
        h.reseed(b"seed")
    assert info.value.errno == errno.ELOOP
    assert (tmp_path / "target").read_bytes() == b""


# -- through the service --------------------------------------------------------------

def test_the_rpcs_over_ttrpc(tmp_path: Path) -> None:
    clock: list[int] = []
    ioctl = FakeIoctl()
    containers = Containers(RuntimeConfig(run_dir=str(tmp_path), cgroup_parent=""), Reaper())
    service = AgentService(containers, Storages(str(tmp_path)), StartupInfo(), False,
                           handover=handover(tmp_path, clock, ioctl))
    server = Server()
    server.register(SERVICE, service.methods())
    path = str(tmp_path / "agent.sock")

    async def main() -> None:
        listener = await asyncio.start_unix_server(server.serve_connection, path)
        client = Client(*await asyncio.open_unix_connection(path))
        try:
            await client.call(SERVICE, "SetGuestDateTime",
                              pb.SetGuestDateTimeRequest(Sec=1_900_000_000, Usec=7),
                              empty_pb2.Empty, timeout=5)
            assert clock == [1_900_000_000_000_007_000]
            await client.call(SERVICE, "ReseedRandomDev", pb.ReseedRandomDevRequest(data=b"s"),
                              empty_pb2.Empty, timeout=5)
            assert ioctl.calls == [(str(tmp_path / "random"), RNDRESEEDCRNG)]
            for method, req in (("SetGuestDateTime", pb.SetGuestDateTimeRequest(Usec=10**6)),
                                ("ReseedRandomDev", pb.ReseedRandomDevRequest())):
                with pytest.raises(TtrpcError) as err:
                    await client.call(SERVICE, method, req, empty_pb2.Empty, timeout=5)
                assert err.value.code == Code.INVALID_ARGUMENT
            assert len(clock) == 1 and len(ioctl.calls) == 1
        finally:
            await client.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())


def test_a_booting_agent_does_not_import_the_handover() -> None:
    import subprocess
    import sys

    code = "import sys, agent.main, agent.service; print('agent.handover' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.split()[0] == "False", out  # only a VM restored from a template needs it
