"""Opening a byte stream to the agent from an address URI.

- ``serial:///abs/path``: QEMU's unix-socket chardev of the virtio-serial port;
- ``vsock://<cid>:<port>``: AF_VSOCK (vhost-vsock hosts);
- ``hvsock:///abs/path:<port>``: hybrid vsock, a unix socket that takes ``CONNECT <port>\\n``
  and answers ``OK <n>\\n`` (VMMs that expose vsock that way).
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urlsplit

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def parse_address(address: str) -> tuple[str, str, int]:
    """Split an agent address into (scheme, path-or-cid, port); raise ValueError if bad."""
    parts = urlsplit(address)
    if parts.scheme == "serial" and parts.path.startswith("/"):
        return "serial", parts.path, 0
    if parts.scheme == "vsock" and parts.hostname and parts.port:
        return "vsock", parts.hostname, parts.port
    if parts.scheme == "hvsock" and ":" in parts.path:
        path, _, port = parts.path.rpartition(":")
        if path.startswith("/") and port.isdigit():
            return "hvsock", path, int(port)
    raise ValueError(
        f"unsupported agent address {address!r}: expected serial:///path, "
        "vsock://<cid>:<port> or hvsock:///path:<port>"
    )


#: While the guest boots nothing listens on its vsock port: the connection is reset (kernel
#: vsock) or closed before ``OK`` (hybrid). Try again after this, doubling up to the cap; the
#: caller's deadline bounds the whole.
RETRY_FIRST = 0.02
RETRY_MAX = 0.25
#: Longest ``OK <port>\n`` answer read.
MAX_OK_LINE = 32


class NotListening(ConnectionError):
    """The guest has no listener on the port (yet)."""


async def open_stream(address: str) -> Stream:
    """Connect to the agent channel at ``address``; on vsock, retry while the guest does not
    listen yet (the caller bounds the wait)."""
    scheme, where, port = parse_address(address)
    if scheme == "serial":
        return await asyncio.open_unix_connection(where)
    delay = RETRY_FIRST
    while True:
        try:
            if scheme == "vsock":
                return await _dial_vsock(int(where), port)
            return await _dial_hybrid(where, port)
        except NotListening:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


async def _dial_vsock(cid: int, port: int) -> Stream:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (cid, port))
    except (ConnectionResetError, ConnectionRefusedError, TimeoutError) as exc:
        sock.close()
        raise NotListening(f"vsock {cid}:{port}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _dial_hybrid(path: str, port: int) -> Stream:
    """``CONNECT <port>\n``, then ``OK <host port>\n`` once the guest accepted; the back-end
    closes the connection when nobody listens on the port."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
        writer.close()
        raise NotListening(f"hybrid vsock {path} port {port}: closed") from exc
    except BaseException:
        writer.close()
        raise
    words = line.split()
    if len(line) > MAX_OK_LINE or len(words) != 2 or words[0] != b"OK":
        writer.close()
        raise ConnectionError(f"hybrid vsock {path} refused port {port}: {line[:64]!r}")
    return reader, writer


def dial_blocking(address: str, timeout: float) -> socket.socket:
    """A connected socket to ``address`` (serial, vsock or hybrid vsock) for synchronous
    callers (the CLI); no retry: the guest is expected to listen already. `OSError` (a
    `ConnectionError` when the hybrid back-end refuses) otherwise."""
    scheme, where, port = parse_address(address)
    family = socket.AF_VSOCK if scheme == "vsock" else socket.AF_UNIX
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((int(where), port) if scheme == "vsock" else where)
        if scheme == "hvsock":
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n") and len(line) <= MAX_OK_LINE:
                chunk = sock.recv(1)  # byte by byte: what follows the line is the stream's
                if not chunk:
                    raise ConnectionError(f"hybrid vsock {where}: nothing listens on guest "
                                          f"port {port}")
                line += chunk
            if not line.startswith(b"OK ") or not line.endswith(b"\n"):
                raise ConnectionError(f"hybrid vsock {where} refused port {port}: {line!r}")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock
