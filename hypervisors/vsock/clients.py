"""The host side of the vhost-user-vsock back-end: hybrid-vsock clients on a unix socket.

A client connects to the back-end's hybrid socket, writes ``CONNECT <port>\\n`` and, once the
guest accepts, reads ``OK <host port>\\n``; from then on the unix stream is the vsock stream
(Firecracker's convention, `hybrid`). `HostClients` does the socket I/O on the event loop
(``add_reader``/``add_writer``, non-blocking sockets) and feeds the device:

* client bytes -> `VsockDevice.write`; what it does not take (no credit, `streams.MAX_PENDING`
  full) is kept and the client is not read again until `Writable`: back-pressure, bounded;
* `Data` -> the client's outbox, and `VsockDevice.consumed` only once the bytes are really
  written, so a client that does not read stops the guest by credit, not by our memory;
* client EOF -> `close_write`; client gone -> `close_stream`, and `reset_stream` if the guest
  never finishes the close within `CLOSE_TIMEOUT` (a stream must not count against
  `streams.MAX_STREAMS` forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from hypervisors.vsock import hybrid
from hypervisors.vsock.device import Output, VsockDevice
from hypervisors.vsock.errors import VsockError
from hypervisors.vsock.streams import (
    Data,
    EndOfStream,
    HostEvent,
    Opened,
    Rejected,
    StreamClosed,
    Writable,
)

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
#: How long a stream the client left may wait for the guest's half of the close.
CLOSE_TIMEOUT = 10.0
#: Clients still in the handshake at once (each holds at most `hybrid.MAX_LINE` bytes).
MAX_HANDSHAKES = 16

Apply = Callable[[Output], None]


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    handshake: hybrid.ConnectReader = field(default_factory=hybrid.ConnectReader)
    port: int | None = None  # the host port once `connect` took the request
    inbox: bytes = b""  # client bytes the device has not taken yet
    outbox: bytearray = field(default_factory=bytearray)  # guest bytes not yet written
    guest_eof: bool = False  # the guest will send no more: shut our write side once empty
    lingering: bool = False  # the stream ended cleanly: close once the outbox is written


class HostClients:
    """Every hybrid client of one device."""

    def __init__(self, device: VsockDevice, apply: Apply) -> None:
        """Serve clients of `device`; `apply` carries out each `Output` (signals, events)."""
        self._device = device
        self._apply = apply
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, _Client] = {}
        self._handshaking: set[_Client] = set()
        self._listener: socket.socket | None = None

    def listen(self, listener: socket.socket) -> None:
        """Accept clients on `listener` (already bound and listening, root-only)."""
        listener.setblocking(False)
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening and drop every client."""
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for client in [*self._handshaking, *self._streams.values()]:
            self._drop(client)

    # -- events from the device ---------------------------------------------------------

    def dispatch(self, events: list[HostEvent]) -> None:
        """Carry out the device's host events."""
        for event in events:
            client = self._streams.get(event.port)
            if client is None:
                continue
            if isinstance(event, Opened):
                self._opened(client, event.port)
            elif isinstance(event, Data):
                client.outbox += event.data
                self._flush(client)
            elif isinstance(event, Writable):
                self._feed_device(client)
            elif isinstance(event, EndOfStream):
                client.guest_eof = True
                self._flush(client)
            elif isinstance(event, StreamClosed) and not event.reset:
                # A graceful end: what the guest sent still goes out, then the client is
                # closed (or dropped after CLOSE_TIMEOUT if it never reads it).
                self._streams.pop(event.port, None)
                client.lingering = client.guest_eof = True
                self._flush(client)
                self._loop.call_later(CLOSE_TIMEOUT, self._drop, client)
            elif isinstance(event, Rejected | StreamClosed):
                self._streams.pop(event.port, None)
                self._drop(client)

    # -- sockets ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self._handshaking) >= MAX_HANDSHAKES:
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock)
        self._handshaking.add(client)
        self._loop.add_reader(sock.fileno(), self._read_handshake, client)

    def _read_handshake(self, client: _Client) -> None:
        try:
            data = client.sock.recv(hybrid.MAX_LINE)
            line = client.handshake.feed(data) if data else None
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, VsockError) as exc:
            log.info("vsock client handshake refused: %s", exc)
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        if line is None:
            return
        self._loop.remove_reader(client.sock.fileno())
        self._handshaking.discard(client)
        try:
            port, out = self._device.connect(line.port)
        except VsockError as exc:
            log.warning("vsock client for guest port %d refused: %s", line.port, exc)
            self._drop(client)
            return
        client.port, client.inbox = port, line.rest
        self._streams[port] = client
        self._apply(out)

    def _opened(self, client: _Client, port: int) -> None:
        try:
            client.sock.send(hybrid.format_ok(port))  # a fresh socket's buffer takes it
        except OSError:
            self._client_gone(client)
            return
        self._feed_device(client)

    def _feed_device(self, client: _Client) -> None:
        """Give the device the bytes it did not take, then read the client again."""
        if client.port is None:
            return
        if client.inbox:
            taken, out = self._device.write(client.port, client.inbox)
            client.inbox = client.inbox[taken:]
            self._apply(out)
        if not client.inbox and client.port in self._streams:
            self._loop.add_reader(client.sock.fileno(), self._read_stream, client)

    def _read_stream(self, client: _Client) -> None:
        assert client.port is not None
        try:
            data = client.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._client_gone(client)
            return
        if not data:
            self._loop.remove_reader(client.sock.fileno())
            self._apply(self._device.close_write(client.port))
            return
        taken, out = self._device.write(client.port, data)
        if taken < len(data):
            client.inbox = data[taken:]
            self._loop.remove_reader(client.sock.fileno())  # until Writable
        self._apply(out)

    def _flush(self, client: _Client) -> None:
        written = 0
        try:
            while client.outbox:
                n = client.sock.send(client.outbox)
                del client.outbox[:n]
                written += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._client_gone(client)
            return
        if client.outbox:
            self._loop.add_writer(client.sock.fileno(), self._flush, client)
        else:
            self._loop.remove_writer(client.sock.fileno())
            if client.guest_eof:
                with contextlib.suppress(OSError):
                    client.sock.shutdown(socket.SHUT_WR)
            if client.lingering:
                self._drop(client)
        # Credit back only to a stream the device still has (data and the close may come
        # in one kick: the device has dropped the stream by the time its Data is written).
        port = client.port
        if written and port in self._streams and port in self._device.streams.ports():
            assert port is not None
            self._apply(self._device.consumed(port, written))

    def _client_gone(self, client: _Client) -> None:
        port = client.port
        self._drop(client)
        if port is None or self._streams.pop(port, None) is None:
            return
        self._apply(self._device.close_stream(port))
        if port in self._device.streams.ports():
            self._loop.call_later(CLOSE_TIMEOUT, self._expire, port)

    def _expire(self, port: int) -> None:
        if port in self._device.streams.ports() and port not in self._streams:
            log.info("vsock stream %d: the guest did not finish closing it: reset", port)
            self._apply(self._device.reset_stream(port))

    def _drop(self, client: _Client) -> None:
        self._handshaking.discard(client)
        if client.sock.fileno() >= 0:
            self._loop.remove_reader(client.sock.fileno())
            self._loop.remove_writer(client.sock.fileno())
            client.sock.close()
