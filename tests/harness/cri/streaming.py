"""The client side of CRI's streaming server (Exec, Attach, PortForward) over WebSocket, as
kubectl speaks it: the ``v4.channel.k8s.io`` protocol.

    result = stream(url_from_exec_response, timeout=30)
    result.stdout, result.stderr, result.exit_code

Each binary WebSocket message starts with its channel: 0 stdin, 1 stdout, 2 stderr, 3 the
error channel, where v4 sends the final status as JSON (``{"status": "Success"}``, or a
failure whose ``details.causes`` carry ``ExitCode``). Only what the tests need: no stdin,
no resize, plain ``ws://`` on loopback.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROTOCOL = "v4.channel.k8s.io"
STDOUT, STDERR, ERROR = 1, 2, 3
OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x2, 0x8, 0x9, 0xA
FORWARD_DATA, FORWARD_ERROR = 0, 1  # PortForward: two channels per port
MAX_MESSAGE = 16 << 20


@dataclass
class StreamResult:
    stdout: bytes = b""
    stderr: bytes = b""
    status: dict[str, object] = field(default_factory=dict)

    @property
    def exit_code(self) -> int | None:
        """0 on success, the ExitCode cause on failure, None if no status came."""
        if self.status.get("status") == "Success":
            return 0
        details = self.status.get("details")
        causes = details.get("causes", []) if isinstance(details, dict) else []
        for cause in causes:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                return int(str(cause.get("message")))
        return None


def stream(url: str, timeout: float = 60.0, until: bytes | None = None) -> StreamResult:
    """Connect to a streaming URL and collect output until the server closes (or, with
    ``until``, until stdout contains it: Attach to a running container never ends)."""
    with _connect(url, timeout) as sock:
        result = StreamResult()
        for channel, data in _messages(sock, time.monotonic() + timeout, quiet_timeout=False):
            if channel == STDOUT:
                result.stdout += data
            elif channel == STDERR:
                result.stderr += data
            elif channel == ERROR and data:
                result.status = json.loads(data)
            if until is not None and until in result.stdout:
                break
        return result


@dataclass
class ForwardResult:
    data: bytes = b""
    errors: bytes = b""


def port_forward(url: str, send: bytes, timeout: float = 60.0,
                 until: bytes | None = None) -> ForwardResult:
    """Connect to a PortForward URL (one port), send ``send`` on its data channel and
    collect what comes back until the server closes (or ``until`` arrived). The first
    message of each channel is the port (2 bytes, little-endian): not kept."""
    with _connect(url, timeout) as sock:
        sock.sendall(_frame(OP_BINARY, bytes([FORWARD_DATA]) + send))
        result = ForwardResult()
        seen: set[int] = set()
        for channel, data in _messages(sock, time.monotonic() + timeout, quiet_timeout=True):
            if channel not in seen:  # the port number, once per channel
                seen.add(channel)
                continue
            if channel == FORWARD_DATA:
                result.data += data
            elif channel == FORWARD_ERROR:
                result.errors += data
            if until is not None and until in result.data:
                break
        return result


def _messages(sock: socket.socket, deadline: float,
              quiet_timeout: bool) -> Iterator[tuple[int, bytes]]:
    """(channel, data) of each non-empty message until the server closes or ``deadline``
    (answering pings); a read timeout ends it quietly with ``quiet_timeout``, else raises."""
    reader = _Reader(sock)
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            frame = reader.frame()
        except TimeoutError:
            if quiet_timeout:
                return
            raise
        if frame is None or frame[0] == OP_CLOSE:
            return
        opcode, payload = frame
        if opcode == OP_PING:
            sock.sendall(_frame(OP_PONG, payload))
        elif payload:
            yield payload[0], payload[1:]


def _connect(url: str, timeout: float) -> socket.socket:
    """A WebSocket to a streaming URL of the CRI server (loopback http only)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"not a loopback http URL: {url}")
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
    try:
        _handshake(sock, parts.netloc, parts.path + (f"?{parts.query}" if parts.query else ""))
    except BaseException:
        sock.close()
        raise
    return sock


def _handshake(sock: socket.socket, host: str, path: str) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {PROTOCOL}\r\n\r\n")
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"the streaming server closed during the handshake: {head!r}")
        head += chunk
        if len(head) > 65536:
            raise ConnectionError("oversized handshake reply")
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise ConnectionError(f"the streaming server refused the upgrade: {head!r}")


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.3: clients always mask)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next whole message (fragments joined); None at EOF."""
        opcode, message = 0, b""
        while True:
            head = self._read(2)
            if head is None:
                return None
            fin, op, masked, n = head[0] >> 7, head[0] & 0xF, head[1] >> 7, head[1] & 0x7F
            if n == 126:
                raw = self._read(2)
                n = struct.unpack("!H", raw)[0] if raw else 0
            elif n == 127:
                raw = self._read(8)
                n = struct.unpack("!Q", raw)[0] if raw else 0
            if n > MAX_MESSAGE:
                raise ConnectionError(f"a {n}-byte WebSocket frame")
            mask = self._read(4) if masked else b""
            payload = self._read(n) if n else b""
            if payload is None:
                return None
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = op or opcode
            message += payload
            if fin:
                return opcode, message
