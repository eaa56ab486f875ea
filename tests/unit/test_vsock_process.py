"""`VsockBackend`: the shim's handle on a real back-end process (``python -m
hypervisors.vsock.backend`` behind the parent-death wrapper), and `listen_unix`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostos.procs import process_state
from hypervisors.errors import HypervisorError
from hypervisors.vsock import vhost_user as vu
from hypervisors.vsock.process import BACKEND_MODULE, VsockBackend, backend_argv, listen_unix
from tests.unit.vsock_rig import open_fds

TIMEOUT = 10.0  # a start-up of the interpreter; each wait normally ends well within 1 s


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A socket directory with a short path (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vsb-", dir="/tmp"))
    yield path
    left = sorted(path.iterdir())
    shutil.rmtree(path)
    assert left == []  # every socket (and log) removed


def make(directory: Path) -> VsockBackend:
    return VsockBackend(directory / "vhost-vsock.sock", directory / "vsock.sock", 3,
                        directory / "vsock-backend.stderr")


def is_socket_0600(path: Path) -> bool:
    mode = path.stat().st_mode
    return stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


async def get_features(path: Path) -> asyncio.StreamWriter:
    """Fake QEMU: connect and ask for the features; the back-end serves once it answers."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(vu.encode_message(vu.Request.GET_FEATURES, vu.NoPayload()))
    reply = await asyncio.wait_for(reader.readexactly(vu.HEADER_SIZE + 8), TIMEOUT)
    assert vu.HEADER.unpack_from(reply) == (vu.Request.GET_FEATURES,
                                            vu.VERSION | vu.FLAG_REPLY, 8)
    return writer


def test_backend_argv_runs_the_module_with_the_fds_and_the_cid() -> None:
    argv = backend_argv(7, 8, 42, Path("/run/s/vsock.sock"))
    assert argv == [sys.executable, "-m", BACKEND_MODULE, "--vhost-user-fd", "7",
                    "--hybrid-fd", "8", "--guest-cid", "42", "--name", "/run/s/vsock.sock"]


def test_listen_unix_replaces_a_stale_file_and_is_root_only(short_dir: Path) -> None:
    path = short_dir / "s.sock"
    path.write_text("stale")
    with listen_unix(path):
        assert is_socket_0600(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            peer.connect(str(path))  # listening already
    path.unlink()


def test_listen_unix_leaves_nothing_when_bind_fails(short_dir: Path) -> None:
    before = open_fds()
    with pytest.raises(OSError):
        listen_unix(short_dir / ("x" * 120))  # longer than sun_path
    with pytest.raises(FileNotFoundError):
        listen_unix(short_dir / "missing" / "s.sock")
    assert open_fds() == before


def test_a_start_that_fails_removes_the_socket_it_made(short_dir: Path) -> None:
    backend = VsockBackend(short_dir / "vhost-vsock.sock", short_dir / "missing" / "vsock.sock",
                           3, short_dir / "err")

    async def main() -> None:
        before = open_fds()
        with pytest.raises(HypervisorError, match="failed to start the vsock back-end"):
            await backend.start()
        assert backend.pid is None and open_fds() == before
        await backend.stop()  # nothing started: still fine

    asyncio.run(main())


def test_qemu_leaving_ends_the_process_with_0_and_stop_cleans_up(short_dir: Path) -> None:
    backend = make(short_dir)

    async def main() -> None:
        before = open_fds()
        await backend.start()
        try:
            assert backend.pid is not None
            assert is_socket_0600(backend.vhost_socket)
            assert is_socket_0600(backend.hybrid_socket)
            writer = await get_features(backend.vhost_socket)  # fake QEMU, then it leaves
            writer.close()
            await writer.wait_closed()
            assert await asyncio.wait_for(backend.wait(), TIMEOUT) == 0
        finally:
            await backend.stop()
        assert not backend.vhost_socket.exists() and not backend.hybrid_socket.exists()
        await backend.stop()  # idempotent
        assert open_fds() == before
        assert process_state(backend.pid, None) == "dead"
        log = backend.stderr_path.read_text()
        assert "QEMU connected (guest CID 3)" in log and "QEMU disconnected" in log
        backend.stderr_path.unlink()

    asyncio.run(main())


def test_stop_terminates_a_serving_back_end_gracefully(short_dir: Path) -> None:
    backend = make(short_dir)

    async def main() -> None:
        before = open_fds()
        await backend.start()
        try:
            # A hybrid client may dial before QEMU even came: the kernel queues it.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(TIMEOUT)
                client.connect(str(backend.hybrid_socket))
                qemu = await get_features(backend.vhost_socket)
                await backend.stop()
                assert await backend.wait() == 0  # SIGTERM is a clean end for the back-end
                assert client.recv(1) == b""  # gone with it, no OK
                qemu.close()
                await qemu.wait_closed()
        finally:
            await backend.stop()
        assert not backend.vhost_socket.exists() and not backend.hybrid_socket.exists()
        await backend.stop()
        assert open_fds() == before
        backend.stderr_path.unlink()

    asyncio.run(main())


def test_wait_sees_a_killed_back_end(short_dir: Path) -> None:
    backend = make(short_dir)

    async def main() -> None:
        await backend.start()
        try:
            assert backend.pid is not None
            waiting = asyncio.ensure_future(backend.wait())
            await asyncio.sleep(0)
            assert not waiting.done()  # a long poll: it runs until the process ends
            os.kill(backend.pid, signal.SIGKILL)
            assert await asyncio.wait_for(waiting, TIMEOUT) == -signal.SIGKILL
        finally:
            await backend.stop()
        assert process_state(backend.pid, None) == "dead"
        assert not backend.vhost_socket.exists() and not backend.hybrid_socket.exists()
        backend.stderr_path.unlink()

    asyncio.run(main())


def test_wait_before_start_is_an_error() -> None:
    backend = make(Path("/nonexistent"))
    with pytest.raises(HypervisorError, match="not started"):
        asyncio.run(backend.wait())
