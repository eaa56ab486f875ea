"""kata-runtime metrics: finding the sandbox, reading its endpoint, and every way it fails."""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import main as cli
from cli import metrics as cli_metrics
from sandbox.state import (
    SandboxRecord,
    make_sandbox_dir,
    monitor_socket_path,
    sandbox_path,
    write_record,
)
from tests.unit.test_cli import write_config

TEXT = "# HELP kata_shim_threads threads\n# TYPE kata_shim_threads gauge\nkata_shim_threads 1.0\n"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short directory: the monitor socket's path must fit AF_UNIX's 108 bytes, which
    pytest's own (``/tmp/pytest-of-root/pytest-NNN/popen-gwN/<test name>/...``) outgrows."""
    with tempfile.TemporaryDirectory(prefix="km-") as d:
        yield Path(d)


def add_sandbox(tmp_path: Path, sandbox_id: str, namespace: str = "default") -> Path:
    """A sandbox dir with its record; the endpoint's socket path (nothing listens)."""
    state = tmp_path / "state"
    path = sandbox_path(state, namespace, sandbox_id)
    make_sandbox_dir(path)
    write_record(path, SandboxRecord(sandbox_id, namespace=namespace, hypervisor="qemu"))
    sock = monitor_socket_path(state, namespace, sandbox_id)
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return sock


def metrics(capsys: pytest.CaptureFixture[str], tmp_path: Path,
            *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--config", str(write_config(tmp_path)), "metrics", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[bytes]]:
    """A one-shot server on sandbox sb1's socket: answers with what the test puts in."""
    answers: list[bytes] = []
    requests: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(add_sandbox(tmp_path, "sb1")))
    listener.listen()

    def one() -> None:
        conn, _ = listener.accept()
        with conn:
            requests.append(conn.recv(65536))
            for answer in answers:
                conn.sendall(answer)

    thread = threading.Thread(target=one, daemon=True)
    thread.start()
    yield answers
    thread.join(5)
    listener.close()
    assert not requests or requests[0].startswith(b"GET /metrics HTTP/1.1\r\n")


def test_prints_the_text(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                         serve: list[bytes]) -> None:
    serve.append(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
                 + TEXT.encode())
    assert metrics(capsys, tmp_path, "sb1") == (0, TEXT, "")


def test_no_such_sandbox(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    add_sandbox(tmp_path, "other")
    code, out, err = metrics(capsys, tmp_path, "gone")
    assert (code, out) == (1, "")
    assert err.startswith("kata-runtime metrics: no sandbox gone under ") and "sbs" in err


def test_no_state_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = metrics(capsys, tmp_path, "gone")
    assert code == 1 and "no sandbox gone" in err


def test_in_two_ns(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    add_sandbox(tmp_path, "sb1", "default")
    add_sandbox(tmp_path, "sb1", "k8s.io")
    code, _, err = metrics(capsys, tmp_path, "sb1")
    assert code == 1
    assert "exists in namespaces default, k8s.io: choose one with --namespace" in err
    code, _, err = metrics(capsys, tmp_path, "sb1", "--namespace", "k8s.io")
    assert code == 1 and "serves no metrics" in err  # found; nothing listens
    code, _, err = metrics(capsys, tmp_path, "sb1", "--namespace", "nope")
    assert code == 1 and "no sandbox sb1 in namespace nope" in err


def test_the_socket_of_the_chosen_namespace(tmp_path: Path) -> None:
    add_sandbox(tmp_path, "sb1", "default")
    add_sandbox(tmp_path, "sb1", "k8s.io")
    state = tmp_path / "state"
    assert cli_metrics.find_socket(state, "sb1", "k8s.io") == monitor_socket_path(
        state, "k8s.io", "sb1")


def test_no_socket(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sock = add_sandbox(tmp_path, "sb1")
    code, out, err = metrics(capsys, tmp_path, "sb1")
    assert (code, out) == (1, "")
    assert err.startswith("kata-runtime metrics: sandbox sb1: its shim serves no metrics at "
                          f"{sock}")
    assert "the pod is stopped or starting, or its shim is gone" in err


def test_dead_socket(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The file a killed shim left: nothing listens on it."""
    sock = add_sandbox(tmp_path, "sb1")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    code, _, err = metrics(capsys, tmp_path, "sb1")
    assert code == 1 and "serves no metrics" in err and "refused" in err.lower()


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 404 Not Found"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP answer"),
    (b"", "not an HTTP answer"),
], ids=["404", "ssh", "empty"])
def test_bad_answers(capsys: pytest.CaptureFixture[str], tmp_path: Path, serve: list[bytes],
                     answer: bytes, why: str) -> None:
    serve.append(answer)
    code, out, err = metrics(capsys, tmp_path, "sb1")
    assert (code, out) == (1, "") and why in err and err.count("\n") == 1


def test_oversize(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                  tmp_path: Path, serve: list[bytes]) -> None:
    monkeypatch.setattr(cli_metrics, "MAX_RESPONSE", 1000)
    serve.append(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000)
    code, _, err = metrics(capsys, tmp_path, "sb1")
    assert code == 1 and "answer larger than 1000 bytes" in err


def test_silent_server(tmp_path: Path) -> None:
    sock = add_sandbox(tmp_path, "sb1")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen()
    try:
        with pytest.raises(cli_metrics.MetricsError, match="timed out"):
            cli_metrics.fetch(sock, timeout=0.2)
    finally:
        listener.close()


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["metrics"]) == 2
    assert "sandbox-id" in capsys.readouterr().err
