"""The hybrid-vsock handshake on the host's unix socket (Firecracker's convention).

Source: Firecracker docs/vsock.md, "Host-Initiated Connections": a host client connects to
the device's unix socket and sends ``CONNECT PORT\\n`` (PORT the guest's vsock port in
decimal, ``\\n`` ASCII 0x0A); once the guest accepted, the device answers
``OK PORT\\n`` with the host-side port it assigned, and closes the socket if nobody listens.
Cloud Hypervisor uses the same text and Kata's hybrid-vsock dialer speaks it.

Parsing follows Firecracker's muxer (``read_local_stream_port``): the command is at most 32
bytes including the newline, the keyword is matched case-insensitively, the port is a u32.
We are stricter in one way: exactly two words, nothing after the port. Bytes after the
newline are already stream data (a client may write its first payload in the same send), so
the parsers hand them back.

Sans-IO: `ConnectReader` (device side) and `OkReader` (client side) are fed bytes and
return a result once a whole line is in; anything else raises `HandshakeError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisors.vsock.errors import HandshakeError

#: Longest command line, newline included (Firecracker reads into a 32-byte buffer).
MAX_LINE = 32
U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Line:
    """A parsed handshake line: the port, and stream bytes that followed the newline."""

    port: int
    rest: bytes


def format_connect(port: int) -> bytes:
    """What a host client sends: ``CONNECT <port>\\n``."""
    return b"CONNECT %d\n" % _check_port(port)


def format_ok(host_port: int) -> bytes:
    """What the device answers once connected: ``OK <host port>\\n``."""
    return b"OK %d\n" % _check_port(host_port)


class _LineReader:
    """Buffers up to `MAX_LINE` bytes until a newline."""

    keyword = b""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._done = False

    def feed(self, data: bytes) -> Line | None:
        """Add bytes; return the parsed line once complete, None while incomplete."""
        if self._done:
            raise HandshakeError("the handshake line was already read")
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) >= MAX_LINE:
                raise HandshakeError(f"no newline in the first {MAX_LINE} bytes")
            return None
        if end + 1 > MAX_LINE:
            raise HandshakeError(f"handshake line longer than {MAX_LINE} bytes")
        self._done = True
        port = _parse_line(bytes(self._buffer[:end]), self.keyword)
        return Line(port, bytes(self._buffer[end + 1:]))


class ConnectReader(_LineReader):
    """Device side: reads ``CONNECT <port>\\n`` from a new host client."""

    keyword = b"connect"


class OkReader(_LineReader):
    """Client side: reads ``OK <host port>\\n`` from the device."""

    keyword = b"ok"


def _parse_line(line: bytes, keyword: bytes) -> int:
    words = line.split()
    if len(words) != 2 or words[0].lower() != keyword:
        raise HandshakeError(f"expected '{keyword.decode().upper()} <port>', got {line!r}")
    if not words[1].isdigit():
        raise HandshakeError(f"port {words[1]!r} is not a decimal number")
    port = int(words[1])
    if port > U32:
        raise HandshakeError(f"port {port} does not fit in 32 bits")
    return port


def _check_port(port: int) -> int:
    if not 0 <= port <= U32:
        raise HandshakeError(f"port {port} does not fit in 32 bits")
    return port
