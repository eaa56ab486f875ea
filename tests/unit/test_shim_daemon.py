"""The real daemon, re-executed by `start`, served over ttrpc without a VM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from protocols import task_pb2
from shim import manager
from shim.flags import parse
from shim.service import TASK_SERVICE
from tests.unit.fakes import write_bundle, write_config
from ttrpc import Client, Code, TtrpcError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    config = write_config(tmp_path / "configuration.toml", tmp_path / "state")
    monkeypatch.setenv("KATA_CONF_FILE", str(config))
    monkeypatch.delenv("TTRPC_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    path = write_bundle(tmp_path / "b1")
    os.mkfifo(path / "log")
    yield path
    pid_file = path / "shim.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def sockets() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    yield top / "s"
    shutil.rmtree(top)


def start_daemon(bundle: Path, sockets: Path) -> tuple[str, int, int]:
    """Run `start` in the bundle; the socket path, daemon pid and our end of the log FIFO."""
    log_fd = os.open(bundle / "log", os.O_RDWR | os.O_NONBLOCK)  # as containerd does
    flags = parse(["-namespace", "default", "-address", "/c.sock", "-publish-binary", "/x",
                   "-id", "c1", "start"])  # fmt: skip
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        address = manager.start(flags, b"", socket_dir=sockets)
    finally:
        os.chdir(cwd)
    return address.removeprefix("unix://"), int((bundle / "shim.pid").read_text()), log_fd


def wait_exit(pid: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError("the daemon did not exit")


def read_log(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_daemon_serves_the_task_api_and_exits_on_shutdown(bundle: Path, sockets: Path) -> None:
    path, pid, log_fd = start_daemon(bundle, sockets)

    async def talk() -> None:
        client = await Client.connect_unix(path)
        try:
            reply = await client.call(TASK_SERVICE, "Connect", task_pb2.ConnectRequest(id="c1"),
                                      task_pb2.ConnectResponse, timeout=10)  # fmt: skip
            assert (reply.shim_pid, reply.task_pid) == (pid, 0)
            with pytest.raises(TtrpcError) as info:
                await client.call(TASK_SERVICE, "State", task_pb2.StateRequest(id="c1"),
                                  task_pb2.StateResponse, timeout=10)  # fmt: skip
            assert info.value.code == Code.NOT_FOUND
            with pytest.raises(TtrpcError) as info:
                await client.call(TASK_SERVICE, "Pause", task_pb2.PauseRequest(id="c1"),
                                  empty_pb2.Empty, timeout=10)  # fmt: skip
            assert info.value.code == Code.NOT_FOUND
            with pytest.raises(TtrpcError) as info:
                await client.call(TASK_SERVICE, "Checkpoint",
                                  task_pb2.CheckpointTaskRequest(id="c1"),
                                  empty_pb2.Empty, timeout=10)  # fmt: skip
            assert info.value.code == Code.UNIMPLEMENTED
            await client.call(TASK_SERVICE, "Shutdown", task_pb2.ShutdownRequest(id="c1"),
                              empty_pb2.Empty, timeout=10)  # fmt: skip
        finally:
            await client.close()

    asyncio.run(talk())
    assert wait_exit(pid) == 0
    assert not Path(path).exists()
    logged = read_log(log_fd)
    assert "msg=\"shim daemon serving\"" in logged and "level=info" in logged
    os.close(log_fd)


def test_daemon_stops_on_sigterm(bundle: Path, sockets: Path) -> None:
    path, pid, log_fd = start_daemon(bundle, sockets)
    assert manager.is_listening(Path(path))
    time.sleep(0.5)  # let it install its signal handlers
    os.kill(pid, signal.SIGTERM)
    assert wait_exit(pid) == 0
    assert not Path(path).exists()
    os.close(log_fd)


def test_delete_action_prints_a_delete_response(bundle: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shim", "-namespace", "default", "-address", "/c.sock",
         "-publish-binary", "/x", "-id", "c1", "-bundle", str(bundle), "delete"],
        cwd=bundle, capture_output=True, stdin=subprocess.DEVNULL, check=True,
    )  # fmt: skip
    response = task_pb2.DeleteResponse.FromString(result.stdout)
    assert response.exit_status == 137


def test_start_action_prints_only_the_address(bundle: Path, sockets: Path) -> None:
    del sockets  # the real /run/containerd/s is not ours to use: check a failure's output
    result = subprocess.run(
        [sys.executable, "-m", "shim", "-namespace", "default", "-address", "/c.sock",
         "-publish-binary", "/x", "-id", "c1", "start"],
        cwd=bundle / "rootfs", capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.startswith(b"failed to start shim: failed to read")


def test_the_next_shim_of_the_same_id_starts_while_the_last_one_exits(
        bundle: Path, sockets: Path) -> None:
    """`ctr run --rm x ...; ctr run x ...`: containerd starts the next shim of the id, on
    the same socket path, as soon as Shutdown returns. The old daemon has removed its socket
    by then (else `start` would hand out the address of a daemon about to exit), and its
    exit leaves the new daemon's socket alone."""
    path, pid, log_fd = start_daemon(bundle, sockets)

    async def shut_down() -> None:
        client = await Client.connect_unix(path)
        try:
            await client.call(TASK_SERVICE, "Shutdown", task_pb2.ShutdownRequest(id="c1"),
                              empty_pb2.Empty, timeout=10)  # fmt: skip
        finally:
            await client.close()

    asyncio.run(shut_down())
    assert not Path(path).exists()  # gone before the reply; the daemon still runs a while
    next_path, next_pid, next_log_fd = start_daemon(bundle, sockets)
    assert (next_path, next_pid != pid) == (path, True)
    assert wait_exit(pid) == 0
    assert manager.is_listening(Path(path)), "the old daemon's exit removed the new socket"
    os.kill(next_pid, signal.SIGTERM)
    assert wait_exit(next_pid) == 0
    assert not Path(path).exists()
    for fd in (log_fd, next_log_fd):
        os.close(fd)
