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


async def open_stream(address: str) -> Stream:
    """Connect to the agent channel at ``address``."""
    scheme, where, port = parse_address(address)
    if scheme == "serial":
        return await asyncio.open_unix_connection(where)
    if scheme == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (int(where), port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)
    reader, writer = await asyncio.open_unix_connection(where)
    writer.write(f"CONNECT {port}\n".encode())
    line = await reader.readline()
    if not line.startswith(b"OK"):
        writer.close()
        raise ConnectionError(f"hybrid vsock {where} refused port {port}: {line!r}")
    return reader, writer
