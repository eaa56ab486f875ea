"""Port forwarding into the guest: which TCP ports listen here, and byte streams to them.

The host mirrors each listening port on the pod netns's loopback (where containerd's CRI
dials for ``kubectl port-forward``) and carries every connection it accepts here with
PortForwardOpen / Read (long poll, ``b""`` at end of stream) / Write / CloseWrite / Close.
A connection is a plain non-blocking socket fd driven like a process's stdio
(`agent.streams`); at most `MAX_CONNECTIONS` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass

from agent.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.streams import StreamReader, StreamWriter

MAX_CONNECTIONS = 64
MAX_PORTS = 256
TCP_LISTEN = "0A"
PROC_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


def listening_ports(tables: tuple[str, ...] = PROC_TCP) -> list[int]:
    """TCP ports some socket listens on (any address), sorted, at most `MAX_PORTS`."""
    ports: set[int] = set()
    for path in tables:
        try:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6 in this kernel
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)[:MAX_PORTS]


class _SocketWriter(StreamWriter):
    """Writes to a connection; closing sends FIN (shutdown) instead of closing the fd."""

    async def close(self) -> None:
        async with self._lock:
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    socket.socket(fileno=os.dup(self.fd)).shutdown(socket.SHUT_WR)
            self.close_now()


@dataclass
class _Connection:
    reader: StreamReader
    writer: _SocketWriter


class PortForwards:
    """The open forwarded connections, by id."""

    def __init__(self) -> None:
        self._conns: dict[int, _Connection] = {}
        self._next = 1

    async def open(self, port: int) -> int:
        if not 0 < port < 65536:
            raise InvalidArgument(f"invalid port {port}")
        if len(self._conns) >= MAX_CONNECTIONS:
            raise FailedPrecondition(f"too many forwarded connections (at most "
                                     f"{MAX_CONNECTIONS})")
        sock = await _connect(port)
        fd = sock.detach()
        conn_id, self._next = self._next, self._next + 1
        self._conns[conn_id] = _Connection(StreamReader(fd), _SocketWriter(os.dup(fd)))
        return conn_id

    def _get(self, conn_id: int) -> _Connection:
        conn = self._conns.get(conn_id)
        if conn is None:
            raise NotFound(f"no forwarded connection {conn_id}")
        return conn

    async def read(self, conn_id: int, size: int) -> bytes:
        return await self._get(conn_id).reader.read(size)

    async def write(self, conn_id: int, data: bytes) -> None:
        await self._get(conn_id).writer.write(data)

    async def close_write(self, conn_id: int) -> None:
        await self._get(conn_id).writer.close()

    def close(self, conn_id: int) -> None:
        conn = self._conns.pop(conn_id, None)
        if conn is not None:
            conn.reader.close_now()
            conn.writer.close_now()

    def close_all(self) -> None:
        for conn_id in list(self._conns):
            self.close(conn_id)


async def _connect(port: int) -> socket.socket:
    """A connection to the port on loopback (IPv4, else IPv6), made without blocking."""
    loop = asyncio.get_running_loop()
    errors = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
            return sock
        except (OSError, TimeoutError) as e:
            sock.close()
            errors.append(f"{host}: {e}")
    raise FailedPrecondition(f"nothing answers on port {port} in the guest "
                             f"({'; '.join(errors)})")
