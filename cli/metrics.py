"""``kata-runtime metrics <sandbox-id>``: the Prometheus text a pod's shim serves.

Finds the sandbox under ``<state_dir>/sbs/<namespace>/<id>`` (any namespace; ``--namespace``
picks one when the id is in several), asks its shim's endpoint (HTTP GET /metrics on
``<state_dir>/sk/<digest>/shim-monitor.sock``, see shim/monitor.py) and prints the body as
served. A sandbox that does not exist, or whose shim does not answer: a one-line error on
stderr, exit 1.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import TextIO

from cli.listing import SandboxNotFound, add_sandbox_arguments, find_sandbox
from sandbox.config import RuntimeConfig
from sandbox.inspect import monitor_socket_path

PROG = "kata-runtime"
#: A scrape waits for the guest (AGENT_TIMEOUT 5 s per call in the shim) and reads /proc.
TIMEOUT = 30.0
MAX_RESPONSE = 16 << 20


class MetricsError(Exception):
    """Why no metrics could be shown (the message is printed as is)."""


def add_arguments(sub: argparse.ArgumentParser) -> None:
    """The sub-command's arguments."""
    add_sandbox_arguments(sub)


def find_socket(state_dir: Path, sandbox_id: str, namespace: str | None = None) -> Path:
    """The endpoint's socket of the sandbox; `SandboxNotFound` if there is no such sandbox."""
    entry = find_sandbox(state_dir, sandbox_id, namespace)
    return monitor_socket_path(state_dir, str(entry["namespace"]), sandbox_id)


def fetch(path: Path, timeout: float = TIMEOUT) -> bytes:
    """The body of GET /metrics on the unix socket ``path``; MetricsError otherwise."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            raw = _read_all(sock)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise MetricsError(f"its shim serves no metrics at {path} ({e.strerror}): the pod "
                               "is stopped or starting, or its shim is gone") from e
        except OSError as e:  # TimeoutError too
            raise MetricsError(f"failed to read metrics from {path}: {e}") from e
    return _body(raw, path)


def _read_all(sock: socket.socket) -> bytes:
    chunks, size = [], 0
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise OSError(f"answer larger than {MAX_RESPONSE} bytes")
    return b"".join(chunks)


def _body(raw: bytes, path: Path) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status_line.split(" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise MetricsError(f"failed to read metrics from {path}: not an HTTP answer")
    if parts[1] != "200":
        raise MetricsError(f"failed to read metrics from {path}: {status_line[:200]}")
    return body


def run(config: RuntimeConfig, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the sandbox's metrics; the exit code."""
    try:
        path = find_socket(config.state_dir, args.sandbox_id, args.namespace)
    except SandboxNotFound as e:
        sys.stderr.write(f"{PROG} metrics: {e}\n")
        return 1
    try:
        body = fetch(path)
    except MetricsError as e:
        sys.stderr.write(f"{PROG} metrics: sandbox {args.sandbox_id}: {e}\n")
        return 1
    (out or sys.stdout).write(body.decode("utf-8", "replace"))
    return 0
