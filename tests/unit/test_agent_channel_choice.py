"""The agent channel end to end on the host side, without a VM: which channel a VM gets
(`hypervisors.channel`), how QEMU is told (`qemu.args`, `Qemu._agent_vsock`), and how the
agent client dials it (`agent_client.dial`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_client import dial
from agent_client.dial import open_stream, parse_address
from hypervisors import channel
from hypervisors.accel import AccelChoice
from hypervisors.base import SharedFsDevice, VmSpec, VsockDevice
from hypervisors.channel import (
    AUTO_WITHOUT_KERNEL,
    VSOCK_BACKENDS,
    Channel,
    ChannelChoice,
    ChannelError,
    choose_channel,
)
from hypervisors.errors import HypervisorError
from hypervisors.qemu import vm as qemu_vm
from hypervisors.qemu.args import AgentChannel, VmParams, build_argv
from hypervisors.qemu.config import QemuConfig
from hypervisors.qemu.vm import VHOST_USER_GUEST_CID, Qemu
from hypervisors.statepaths import StatePaths
from tests.unit.vsock_rig import open_fds

# -- choose_channel -----------------------------------------------------------------------

K, V, S = Channel.KERNEL_VSOCK, Channel.VHOST_USER_VSOCK, Channel.SERIAL
#: (use_vsock, vsock_backend, /dev/vhost-vsock present, templates) -> channel (None: error)
EXPECTED: dict[tuple[bool, str, bool, bool], Channel | None] = {}
for _backend, _has, _templates in itertools.product(VSOCK_BACKENDS, (True, False),
                                                    (True, False)):
    EXPECTED[(False, _backend, _has, _templates)] = S  # use_vsock = false wins
EXPECTED.update({
    (True, "kernel", True, False): K, (True, "kernel", True, True): K,
    (True, "kernel", False, False): None, (True, "kernel", False, True): None,
    # Asked for by name, vhost-user is used even with templates on (the operator chose it).
    (True, "vhost-user", True, False): V, (True, "vhost-user", True, True): V,
    (True, "vhost-user", False, False): V, (True, "vhost-user", False, True): V,
    (True, "auto", True, False): K, (True, "auto", True, True): K,
    (True, "auto", False, False): AUTO_WITHOUT_KERNEL,  # decided by measurement
    (True, "auto", False, True): S,  # a vhost-user device's state is not in a saved VM
})


def test_every_combination_is_covered() -> None:
    assert len(EXPECTED) == 2 * len(VSOCK_BACKENDS) * 2 * 2


@pytest.mark.parametrize("case", sorted(EXPECTED, key=repr), ids=repr)
def test_choose_channel(case: tuple[bool, str, bool, bool]) -> None:
    use_vsock, backend, has, templates = case
    want = EXPECTED[case]
    if want is None:
        with pytest.raises(ChannelError) as error:
            choose_channel(use_vsock, backend, has, templates)
        # The message names the fix: load the module, or take our back-end.
        assert "/dev/vhost-vsock absent" in str(error.value)
        assert "modprobe vhost_vsock" in str(error.value)
        assert 'vsock_backend = "vhost-user"' in str(error.value)
        return
    choice = choose_channel(use_vsock, backend, has, templates)
    assert isinstance(choice, ChannelChoice) and choice.channel is want
    assert choice.reason  # logged at start-up and by `kata-runtime check`


@pytest.mark.parametrize("default", [V, S])
def test_auto_without_kernel_vsock_follows_the_measured_default(
        monkeypatch: pytest.MonkeyPatch, default: Channel) -> None:
    monkeypatch.setattr(channel, "AUTO_WITHOUT_KERNEL", default)
    choice = choose_channel(True, "auto", False)
    assert choice.channel is default and "/dev/vhost-vsock absent" in choice.reason
    assert choose_channel(True, "auto", False, True).channel is S  # templates: always serial
    assert choose_channel(True, "auto", True).channel is K  # the kernel's where it exists


def test_the_reasons_say_why() -> None:
    assert "use_vsock = false" in choose_channel(False, "auto", True).reason
    assert "/dev/vhost-vsock present" in choose_channel(True, "auto", True).reason
    assert "/dev/vhost-vsock absent" in choose_channel(True, "auto", False).reason
    assert "templates" in choose_channel(True, "auto", False, True).reason
    assert 'vsock_backend = "vhost-user"' in choose_channel(True, "vhost-user", True).reason


def test_an_unknown_backend_is_refused_even_without_vsock() -> None:
    for use_vsock in (True, False):
        with pytest.raises(ChannelError, match='"vhost_user" is not one of auto, kernel, '
                                               'vhost-user'):
            choose_channel(use_vsock, "vhost_user", True)


# -- QEMU's command line ------------------------------------------------------------------

STATE = Path("/run/kata-py/sbs/sb1")
SOCKETS = Path("/run/kata-py/s/sb1")
CONFIG = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512)
MICROVM = QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", default_memory=512,
                     machine_type="microvm")


def params(**kw: object) -> VmParams:
    base: dict[str, object] = {"sandbox_id": "sb1", "paths": StatePaths(STATE, SOCKETS),
                               "accelerator": "tcg", "shared_fs": None,
                               "agent_channel": AgentChannel.VHOST_USER_VSOCK}
    base.update(kw)
    return VmParams(**base)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_vhost_user_vsock_argv_on_q35() -> None:
    argv = build_argv(CONFIG, params())
    assert option(argv, "-chardev")[-1] == f"socket,id=vsock0,path={SOCKETS}/vhost-vsock.sock"
    assert option(argv, "-device") == ["vhost-user-vsock-pci,id=vsock0dev,chardev=vsock0"]
    # The back-end maps guest RAM: shared memfd RAM, even without virtio-fs.
    assert option(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert option(argv, "-numa") == ["node,memdev=mem"]
    # No virtio-serial port for the agent, and no guest-cid (QEMU asks the back-end).
    assert not any("virtserialport" in a or "agent.sock" in a or "guest-cid" in a
                   for a in argv)


def test_vhost_user_vsock_argv_on_microvm() -> None:
    argv = build_argv(MICROVM, params())
    assert option(argv, "-device") == ["vhost-user-vsock-device,id=vsock0dev,chardev=vsock0"]
    assert option(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    assert option(argv, "-machine")[0].endswith(",memory-backend=mem")


def test_the_other_channels_keep_private_ram() -> None:
    for agent, cid in ((AgentChannel.SERIAL, None), (AgentChannel.VSOCK, 7)):
        argv = build_argv(CONFIG, params(agent_channel=agent, guest_cid=cid))
        assert "-object" not in argv and "vsock0dev" not in " ".join(argv)


def test_vhost_user_vsock_with_virtio_fs_shares_ram_once() -> None:
    share = SharedFsDevice(STATE / "shared", "virtio-fs", "kataShared")
    argv = build_argv(CONFIG, params(shared_fs=share))
    assert option(argv, "-object") == ["memory-backend-memfd,id=mem,size=512M,share=on"]
    drivers = [d.split(",")[0] for d in option(argv, "-device")]
    assert drivers == ["vhost-user-vsock-pci", "vhost-user-fs-pci"]


# -- Qemu: the channel decision and the agent's address ---------------------------------


def qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_kernel_vsock: bool,
         template_dir: Path | None = None, **config: object) -> Qemu:
    monkeypatch.setattr(qemu_vm, "host_has_vhost_vsock", lambda: has_kernel_vsock)
    made = Qemu(QemuConfig(kernel="/k/vmlinuz", initrd="/k/initrd.img", **config),  # type: ignore[arg-type]
                VmSpec("sb1", tmp_path / "state", socket_dir=tmp_path / "s",
                       template_dir=template_dir))
    made._accel = AccelChoice("tcg", "test")
    return made


def with_agent_vsock(vm: Qemu) -> VsockDevice | None:
    """What `start` does before it spawns anything."""
    vsock = vm._agent_vsock()
    if vsock is not None:
        vm._devices.add(vsock)
    return vsock


@pytest.mark.parametrize(("config", "line"), [
    ({"vsock_backend": "vhost-user"},
     'VM sb1: agent channel vsock_backend = "vhost-user": vsock through our back-end'),
    ({}, "VM sb1: agent channel /dev/vhost-vsock absent: virtio-serial"),
])
def test_the_start_up_log_says_which_channel_and_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        config: dict[str, object], line: str) -> None:
    vm = qemu(tmp_path, monkeypatch, False, **config)
    with caplog.at_level(logging.INFO, logger="hypervisors.qemu.vm"):
        with_agent_vsock(vm)
    assert line in caplog.text, caplog.text


@pytest.mark.parametrize("has_kernel_vsock", [True, False])
def test_vhost_user_backend_gives_the_hybrid_address_and_shared_ram(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_kernel_vsock: bool) -> None:
    vm = qemu(tmp_path, monkeypatch, has_kernel_vsock, vsock_backend="vhost-user")
    assert with_agent_vsock(vm) == VsockDevice(VHOST_USER_GUEST_CID, vhost_user=True)
    assert vm.agent_address == f"hvsock://{tmp_path}/s/vsock.sock:1024"
    assert parse_address(vm.agent_address) == ("hvsock", f"{tmp_path}/s/vsock.sock", 1024)
    argv = vm.build_argv()
    assert f"socket,id=vsock0,path={tmp_path}/s/vhost-vsock.sock" in option(argv, "-chardev")
    assert "vhost-user-vsock-pci,id=vsock0dev,chardev=vsock0" in option(argv, "-device")
    assert option(argv, "-object") == ["memory-backend-memfd,id=mem,size=2048M,share=on"]
    assert vm._shares_memory()


@pytest.mark.parametrize("backend", ["auto", "kernel"])
def test_kernel_vsock_reserves_a_cid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     backend: str) -> None:
    """The CID comes from `hypervisors.vsock.cid` (tests/unit/test_vsock_cid.py), with the
    vhost-vsock instance that holds it going to QEMU as vhostfd."""
    held = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    monkeypatch.setattr(qemu_vm, "reserve_guest_cid", lambda: (4242, held))
    vm = qemu(tmp_path, monkeypatch, True, vsock_backend=backend)
    vsock = with_agent_vsock(vm)
    try:
        assert vsock is not None and not vsock.vhost_user
        assert (vsock.guest_cid, vsock.vhost_fd) == (4242, held)
        assert vm.agent_address == "vsock://4242:1024"
        assert f"vhost-vsock-pci,id=vsock0,guest-cid=4242,vhostfd={held}" in \
            option(vm.build_argv(), "-device")
        assert not vm._shares_memory()
    finally:
        vm._close_vhost_fds()


@pytest.mark.parametrize("config, templates", [
    ({"use_vsock": False}, False), ({"use_vsock": False, "vsock_backend": "vhost-user"}, False),
    ({}, True)])
def test_serial_when_vsock_is_off_or_templates_need_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, object],
        templates: bool) -> None:
    vm = qemu(tmp_path, monkeypatch, False, tmp_path / "tpl" if templates else None,
              **config)
    assert with_agent_vsock(vm) is None
    assert vm.agent_address == f"serial://{tmp_path}/s/agent.sock"


def test_auto_without_kernel_vsock_follows_the_channel_decision(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for default in (V, S):
        monkeypatch.setattr(channel, "AUTO_WITHOUT_KERNEL", default)
        vm = qemu(tmp_path, monkeypatch, False)
        vsock = with_agent_vsock(vm)
        if default is V:
            assert vsock == VsockDevice(VHOST_USER_GUEST_CID, vhost_user=True)
            assert vm.agent_address.startswith("hvsock://")
        else:
            assert vsock is None and vm.agent_address.startswith("serial://")


def test_kernel_backend_without_the_device_fails_the_start_naming_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = qemu(tmp_path, monkeypatch, False, vsock_backend="kernel")
    with pytest.raises(HypervisorError, match=r"failed to start VM sb1: .*modprobe vhost_vsock"):
        vm._agent_vsock()


# -- dialing ------------------------------------------------------------------------------


@pytest.mark.parametrize("address, parsed", [
    ("serial:///run/s/agent.sock", ("serial", "/run/s/agent.sock", 0)),
    ("vsock://42:1024", ("vsock", "42", 1024)),
    ("hvsock:///run/s/vsock.sock:1024", ("hvsock", "/run/s/vsock.sock", 1024)),
    ("hvsock:///run/a:b/vsock.sock:7", ("hvsock", "/run/a:b/vsock.sock", 7)),
])
def test_parse_address(address: str, parsed: tuple[str, str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["hvsock:///s.sock",
                                     "hvsock:///s.sock:port", "vsock://42", "serial://rel",
                                     "tcp://127.0.0.1:1024", ""])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="unsupported agent address"):
        parse_address(address)


@pytest.fixture
def hybrid_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="vsb-", dir="/tmp"))
    yield directory / "vsock.sock"
    shutil.rmtree(directory)


class HybridServer:
    """A hybrid-vsock back-end stand-in: closes the first ``refusals`` connections after the
    CONNECT line (nobody listens in the guest yet), then answers ``answer``."""

    def __init__(self, refusals: int, answer: bytes) -> None:
        self.refusals, self.answer = refusals, answer
        self.lines: list[bytes] = []
        self.times: list[float] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.lines.append(await reader.readline())
        self.times.append(time.monotonic())
        if len(self.lines) <= self.refusals:
            writer.close()
            return
        writer.write(self.answer + b"stream bytes")
        await writer.drain()


async def dial_with(path: Path, server: HybridServer) -> tuple[bytes | BaseException, int]:
    """Dial ``hvsock://path:1024``: (the bytes after the answer, or the error; fds left)."""
    before = open_fds()
    listener = await asyncio.start_unix_server(server.serve, str(path))
    result: bytes | BaseException
    try:
        reader, writer = await asyncio.wait_for(open_stream(f"hvsock://{path}:1024"), 5)
        result = await asyncio.wait_for(reader.readexactly(12), 5)
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, ValueError) as exc:
        result = exc
    finally:
        listener.close()
        for writer in server.writers:
            writer.close()
        await listener.wait_closed()
        await asyncio.sleep(0)  # the transports close on the next turn
    return result, open_fds() - before


def test_hybrid_dial_retries_while_the_guest_does_not_listen(hybrid_path: Path) -> None:
    server = HybridServer(3, b"OK 1073741824\n")
    result, leaked = asyncio.run(dial_with(hybrid_path, server))
    assert result == b"stream bytes"  # the stream, right after the OK line
    assert server.lines == [b"CONNECT 1024\n"] * 4
    gaps = [b - a for a, b in itertools.pairwise(server.times)]
    assert gaps[0] >= dial.RETRY_FIRST and gaps[1] >= 2 * dial.RETRY_FIRST  # backing off
    assert leaked == 0


@pytest.mark.parametrize("answer", [b"NO 1024\n", b"OK\n", b"OK 1 2\n", b"ok 5\n",
                                    b"OK " + b"1" * 40 + b"\n"])
def test_hybrid_dial_refuses_a_bad_answer_at_once(hybrid_path: Path, answer: bytes) -> None:
    server = HybridServer(0, answer)
    result, leaked = asyncio.run(dial_with(hybrid_path, server))
    assert type(result) is ConnectionError  # not retried: not "nobody listens yet"
    assert "refused port 1024" in str(result)
    assert len(server.lines) == 1 and leaked == 0


def test_hybrid_dial_to_a_missing_socket_fails_at_once(hybrid_path: Path) -> None:
    async def main() -> None:
        before = open_fds()
        started = time.monotonic()
        with pytest.raises(FileNotFoundError):
            await asyncio.wait_for(open_stream(f"hvsock://{hybrid_path}:1024"), 5)
        assert time.monotonic() - started < 1  # not retried: there is no back-end at all
        assert open_fds() == before

    asyncio.run(main())


def test_serial_dial_is_a_plain_unix_connection(hybrid_path: Path) -> None:
    async def main() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(hybrid_path))
            listener.listen(1)
            reader, writer = await open_stream(f"serial://{hybrid_path}")
            peer, _ = listener.accept()
            with contextlib.closing(peer):
                peer.sendall(b"ttrpc")
                assert await reader.readexactly(5) == b"ttrpc"  # no handshake on serial
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())
