"""Where the agent serves ttrpc: a unix socket (host tests), vsock, or a virtio-serial port.

Theory of operation
-------------------
``serve(handler, listen, on_ready)`` picks the channel from ``listen``:

* ``unix:/path`` - a listening unix socket (host tests, non-PID-1 mode);
* ``vsock:PORT`` - AF_VSOCK listening on any CID;
* ``serial:/dev/vportNpM`` - that virtio-serial port;
* ``None`` (the guest default) - vsock port 1024 when the VM has a virtio-vsock device
  (``/dev/vsock`` alone proves nothing: it exists once the module loads), else the
  virtio-serial port named ``agent.channel.0`` (found through
  ``/sys/class/virtio-ports/*/name``; the port appears asynchronously after virtio_console
  loads, so it is polled for).

A serial port is one byte stream, one host at a time. While no host client is connected
the port polls HUP and a read returns EOF at once, so the loop is: open the char device,
poll until HUP clears (the host connected), serve one ttrpc connection on it until EOF
(the host went away), close it, back off 20-100 ms, and start over. ``on_ready`` is called
once, when the first listener/port is open: that is the moment the agent is "serving".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import sys
import time
from collections.abc import Awaitable, Callable

AGENT_PORT_NAME = "agent.channel.0"
VSOCK_PORT = 1024
VIRTIO_PORTS = "/sys/class/virtio-ports"
_PORT_WAIT = 60.0  # seconds; under TCG the port's name can take a while to arrive
_BACKOFF_MIN = 0.02
_BACKOFF_MAX = 0.1

ServeFn = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
ReadyFn = Callable[[str], None]


async def serve(handler: ServeFn, listen: str | None, on_ready: ReadyFn) -> None:
    """Serve ``handler`` on the channel ``listen`` names (see module docstring); forever."""
    if listen is None:
        if vsock_available():
            listen = f"vsock:{VSOCK_PORT}"
        else:
            listen = "serial:" + await wait_serial_port(AGENT_PORT_NAME)
    kind, _, where = listen.partition(":")
    if kind == "unix":
        await serve_unix(handler, where, on_ready)
    elif kind == "vsock":
        await serve_vsock(handler, int(where), on_ready)
    elif kind == "serial":
        await serve_serial(handler, where, on_ready)
    else:
        raise ValueError(f"unknown channel {listen!r}: want unix:PATH, vsock:PORT, serial:DEV")


# -- sockets ----------------------------------------------------------------------------

async def serve_unix(handler: ServeFn, path: str, on_ready: ReadyFn) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket from a previous run
    server = await asyncio.start_unix_server(handler, path=path)
    os.chmod(path, 0o600)
    on_ready(path)
    async with server:
        await server.serve_forever()


VIRTIO_DEVICES = "/sys/bus/virtio/devices"
VIRTIO_ID_VSOCK = 0x13


def has_virtio_vsock(devices_dir: str = VIRTIO_DEVICES) -> bool:
    """Whether the VM has a virtio-vsock device (``/dev/vsock`` exists without one)."""
    try:
        names = os.listdir(devices_dir)
    except OSError:
        return False
    for name in names:
        try:
            with open(os.path.join(devices_dir, name, "device"), encoding="ascii") as f:
                if int(f.read().strip(), 16) == VIRTIO_ID_VSOCK:
                    return True
        except (OSError, ValueError):
            continue
    return False


def vsock_available() -> bool:
    """vsock is used only when the VM has a vsock device and the transport is loaded."""
    if not os.path.exists("/dev/vsock") or not hasattr(socket, "AF_VSOCK"):
        return False
    if not has_virtio_vsock():
        return False
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError:
        return False  # the vsock transport module is not loaded
    return True


async def serve_vsock(handler: ServeFn, port: int, on_ready: ReadyFn) -> None:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(16)
    sock.setblocking(False)
    server = await asyncio.start_server(handler, sock=sock)
    on_ready(f"vsock port {port}")
    async with server:
        await server.serve_forever()


# -- virtio-serial ----------------------------------------------------------------------

def find_serial_port(name: str, sys_dir: str = VIRTIO_PORTS) -> str | None:
    """The /dev path of the virtio-serial port called ``name``, if it exists yet."""
    try:
        entries = os.listdir(sys_dir)
    except FileNotFoundError:
        return None
    for entry in sorted(entries):
        try:
            with open(os.path.join(sys_dir, entry, "name")) as f:
                if f.read().strip() == name:
                    return f"/dev/{entry}"
        except OSError:
            continue
    return None


async def wait_serial_port(name: str, timeout: float = _PORT_WAIT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        path = find_serial_port(name)
        if path is not None and os.path.exists(path):
            return path
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"no virtio-serial port named {name} in {VIRTIO_PORTS}")
        await asyncio.sleep(0.01)


def open_char_device(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)


async def serve_serial(handler: ServeFn, path: str, on_ready: ReadyFn,
                       opener: Callable[[str], int] = open_char_device) -> None:
    """One connection at a time on the port, reopened after every disconnect."""
    ready = False
    backoff = _BACKOFF_MIN
    while True:
        try:
            fd = opener(path)
        except OSError:  # EBUSY: the last close has not landed yet
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            continue
        if not ready:
            on_ready(path)
            ready = True
        started = time.monotonic()
        await _wait_host(fd)
        await _serve_fd(handler, fd)
        # A real session resets the backoff; an instant EOF (no host) keeps backing off.
        backoff = _BACKOFF_MIN if time.monotonic() - started > 1.0 else backoff
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _BACKOFF_MAX)


async def _wait_host(fd: int) -> None:
    """Poll until the port stops reporting HUP, i.e. a host client is connected."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    delay = _BACKOFF_MIN
    while any(ev & select.POLLHUP for _, ev in poller.poll(0)):
        await asyncio.sleep(delay)
        delay = min(delay * 2, _BACKOFF_MAX)


async def _serve_fd(handler: ServeFn, fd: int) -> None:
    """Run ``handler`` on a reader/writer pair over ``fd``; closes ``fd`` when done."""
    reader, writer = await open_fd_streams(fd)
    try:
        await handler(reader, writer)
    except (OSError, EOFError) as exc:
        # e.g. EIO when the other side vanished mid-read: same as EOF, serve the next host.
        print(f"kata-agent: channel session ended: {exc!r}", file=sys.stderr, flush=True)
    finally:
        writer.close()


async def open_fd_streams(fd: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a char device fd (takes ownership of ``fd``).

    Reading and writing use separate pipe transports on ``fd`` and a dup of it; closing the
    writer closes both. Not for sockets: a write-pipe transport on a socket treats any
    readability as the peer closing.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    write_transport, write_protocol = await loop.connect_write_pipe(
        lambda: _WriteProtocol(read_transport), os.fdopen(os.dup(fd), "wb", buffering=0))
    return reader, asyncio.StreamWriter(write_transport, write_protocol, reader, loop)


class _WriteProtocol(asyncio.StreamReaderProtocol):
    """The write side's protocol. A StreamReaderProtocol (on a dummy reader) rather than
    FlowControlMixin because StreamWriter.wait_closed needs its close waiter; closing the
    write side closes the read side too, so one ``writer.close()`` ends the session."""

    def __init__(self, read_transport: asyncio.BaseTransport) -> None:
        super().__init__(asyncio.StreamReader())
        self._read_transport = read_transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._read_transport.close()
        super().connection_lost(exc)
