"""The device's set of vsock streams, sans-IO: routing, host ports, bounds, rx ordering.

Theory of operation: `StreamTable` owns every `Connection` of one device. The device feeds it
the bytes of each tx packet (`receive_bytes`) and drains packets for the rx queue
(`next_packet`, sized to the guest's buffer); the host side (the hybrid unix socket of each
client, in the future event loop) calls `connect`, `write`, `consumed`, `close_write`,
`close` and `reset`. What the host side must do comes back as `HostEvent`s from
`take_events`. No I/O, no clock.

Streams are host-initiated only (a host client's ``CONNECT <port>``): each gets a host port
from ``2^30`` upwards (Firecracker's first local port), allocated next-fit so that a port is
reused only after the whole range went round, which keeps a late RST for an old stream from
hitting a new one. A guest REQUEST (guest-initiated stream) is refused with RST: nothing on
the host listens for the guest yet.

Bounds (everything from the guest is untrusted, and a guest that never reads must not make
the host side grow): at most `MAX_STREAMS` streams; per stream, host bytes not yet written
into the rx queue (waiting for credit, or queued as packets) stay within `MAX_PENDING` and
`write` accepts only what fits (back-pressure: the caller stops reading its client until
`Writable`); guest bytes are bounded by the credit we grant (`buf_alloc`, see
`connections`); RSTs for packets that match no stream are capped at `MAX_CONTROL`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque
from dataclasses import dataclass, field

from hypervisors.vsock import packets
from hypervisors.vsock.connections import (
    DEFAULT_BUF_ALLOC,
    Closed,
    Connected,
    Connection,
    CreditAvailable,
    DataReceived,
    Event,
    PeerShutdown,
    Refused,
    Reset,
    State,
    refuse,
)
from hypervisors.vsock.errors import CapacityError, ConnectionStateError, PacketError
from hypervisors.vsock.packets import HEADER_SIZE, HOST_CID, U32, Op, Packet, Shutdown

#: Streams per device. The agent channel needs a handful (ttrpc, debug console, port
#: forwards); each stream may hold MAX_PENDING host bytes plus DEFAULT_BUF_ALLOC guest bytes
#: in its host client's hands, so 64 streams bound that at 32 MiB per sandbox.
MAX_STREAMS = 64
#: Host bytes per stream not yet in the guest's rx buffers: enough for a 64 KiB packet and
#: its successors to be in flight, small enough that a guest that stops reading costs
#: little. Beyond it `write` accepts nothing (back-pressure to the host client).
MAX_PENDING = 256 * 1024
#: RSTs answering stray guest packets: beyond this a guest that floods strays and never
#: reads its rx queue gets no more answers (they are advisory), instead of unbounded memory.
MAX_CONTROL = 256
#: Host ports for host-initiated streams: 2^30 up to 2^32 - 2 (2^32 - 1 is VMADDR_PORT_ANY).
HOST_PORT_FIRST = 1 << 30
HOST_PORT_LAST = U32 - 1
_PORTS = struct.Struct("<QQII")


@dataclass(frozen=True)
class Opened:
    """The guest accepted the stream: answer the client `hybrid.format_ok` (port)."""

    port: int


@dataclass(frozen=True)
class Rejected:
    """Nobody listens on that guest port: close the client."""

    port: int


@dataclass(frozen=True)
class Data:
    """Bytes from the guest for the client; call `StreamTable.consumed` once written."""

    port: int
    data: bytes


@dataclass(frozen=True)
class EndOfStream:
    """The guest will send no more: shut the client's write side."""

    port: int


@dataclass(frozen=True)
class Writable:
    """A stream whose `write` fell short has room again: resume reading the client."""

    port: int


@dataclass(frozen=True)
class StreamClosed:
    """The stream is gone (``reset``: abnormally, with ``reason``): close the client."""

    port: int
    reset: bool
    reason: str = ""


HostEvent = Opened | Rejected | Data | EndOfStream | Writable | StreamClosed


@dataclass
class _Stream:
    conn: Connection
    pending: bytearray = field(default_factory=bytearray)  # host bytes awaiting credit
    out: deque[Packet] = field(default_factory=deque)  # packets awaiting an rx buffer
    out_bytes: int = 0
    shut: Shutdown = Shutdown.NONE  # directions the host wants shut once `pending` drains
    blocked: bool = False  # a write fell short: emit Writable when room comes back
    credit_requested: bool = False


class StreamTable:
    """Every stream of one device, keyed by host port."""

    def __init__(self, guest_cid: int, *, buf_alloc: int = DEFAULT_BUF_ALLOC,
                 max_streams: int = MAX_STREAMS, max_pending: int = MAX_PENDING) -> None:
        """No streams yet; `guest_cid` is the only source address accepted from the guest."""
        self.guest_cid = guest_cid
        self.buf_alloc, self.max_streams, self.max_pending = buf_alloc, max_streams, max_pending
        self.dropped = 0  # guest packets ignored (spoofed addresses, malformed, stray RSTs)
        self._streams: dict[int, _Stream] = {}
        self._ready: deque[int] = deque()  # ports with packets in `out`, round robin
        self._control: deque[Packet] = deque()
        self._events: list[HostEvent] = []
        self._next_port = HOST_PORT_FIRST

    def __len__(self) -> int:
        """The number of open streams."""
        return len(self._streams)

    def ports(self) -> tuple[int, ...]:
        """The host ports in use."""
        return tuple(self._streams)

    def take_events(self) -> list[HostEvent]:
        """What the host side must do, in order (drains the list)."""
        events, self._events = self._events, []
        return events

    # -- the host side ----------------------------------------------------------------

    def connect(self, guest_port: int) -> int:
        """Start a stream to `guest_port` (queues a REQUEST); returns its host port."""
        if len(self._streams) >= self.max_streams:
            raise CapacityError(f"{len(self._streams)} vsock streams open, the limit")
        if not 0 <= guest_port <= U32:
            raise ConnectionStateError(f"guest port {guest_port} does not fit in 32 bits")
        port = self._allocate()
        stream = _Stream(Connection.connect(port, self.guest_cid, guest_port,
                                            buf_alloc=self.buf_alloc))
        self._streams[port] = stream
        self._collect(port, stream)
        return port

    def room(self, port: int) -> int:
        """How many bytes `write` would accept now."""
        stream = self._get(port)
        return max(0, self.max_pending - len(stream.pending) - stream.out_bytes)

    def write(self, port: int, data: bytes) -> int:
        """Take as much of `data` as the bound allows; returns the count taken."""
        stream = self._get(port)
        if stream.shut & Shutdown.SEND:
            raise ConnectionStateError(f"stream {port}: write after close_write")
        take = data[:self.room(port)]
        stream.pending += take
        stream.blocked = len(take) < len(data)
        self._flush(port, stream)
        return len(take)

    def consumed(self, port: int, count: int) -> None:
        """The client took `count` bytes of `Data` (grants the guest credit back)."""
        stream = self._get(port)
        stream.conn.consumed(count)
        self._collect(port, stream)

    def close_write(self, port: int) -> None:
        """The client sent EOF: SHUTDOWN(SEND) once the pending bytes are out."""
        self._shut(port, Shutdown.SEND)

    def close(self, port: int) -> None:
        """The client is gone: SHUTDOWN(BOTH) after the pending bytes, then the guest's RST."""
        stream = self._get(port)
        if stream.conn.state == State.CONNECTING:
            self.reset(port)
            return
        self._shut(port, Shutdown.BOTH)

    def reset(self, port: int) -> None:
        """Abort the stream at once (RST); no event, the caller asked for it."""
        stream = self._get(port)
        stream.conn.reset()
        self._remove(port, stream)

    def reset_all(self, reason: str) -> None:
        """The device is gone or reset: every stream ends, nothing more goes to the guest."""
        for port, stream in list(self._streams.items()):
            stream.conn.reset()
            self._events.append(StreamClosed(port, True, reason))
            self._remove(port, stream)
        self._control.clear()

    # -- the guest side ---------------------------------------------------------------

    def receive_bytes(self, data: bytes) -> None:
        """One tx packet; malformed ones reset the stream they name, if any."""
        try:
            packet = packets.parse(data)
        except PacketError as exc:
            self._malformed(data, str(exc))
            return
        self.receive(packet)

    def receive(self, packet: Packet) -> None:
        """Route one parsed guest packet."""
        if packet.src_cid != self.guest_cid or packet.dst_cid != HOST_CID:
            self.dropped += 1  # spoofed or misaddressed: Linux vhost-vsock drops these too
            return
        stream = self._streams.get(packet.dst_port)
        if stream is None or stream.conn.peer_port != packet.src_port:
            self._refuse(packet)
            return
        self._apply(packet.dst_port, stream, stream.conn.receive(packet))

    def has_output(self) -> bool:
        """Whether a packet waits for an rx buffer."""
        return bool(self._control or self._ready)

    def next_packet(self, room: int) -> bytes | None:
        """The next packet for the guest, its RW payload cut to fit `room` (> header size)."""
        if room <= HEADER_SIZE:
            raise ConnectionStateError(f"an rx buffer of {room} bytes cannot carry data")
        if self._control:
            return packets.build(self._control.popleft())
        if not self._ready:
            return None
        port = self._ready.popleft()
        stream = self._streams[port]
        packet = stream.out[0]
        if HEADER_SIZE + len(packet.payload) > room:
            cut = room - HEADER_SIZE
            stream.out[0] = dataclasses.replace(packet, payload=packet.payload[cut:])
            packet = dataclasses.replace(packet, payload=packet.payload[:cut])
        else:
            stream.out.popleft()
        stream.out_bytes -= len(packet.payload)
        if stream.out:
            self._ready.append(port)  # round robin between streams, in order within one
        self._flush(port, stream)
        return packets.build(packet)

    # -- internals --------------------------------------------------------------------

    def _get(self, port: int) -> _Stream:
        stream = self._streams.get(port)
        if stream is None:
            raise ConnectionStateError(f"no vsock stream on host port {port}")
        return stream

    def _allocate(self) -> int:
        span = HOST_PORT_LAST - HOST_PORT_FIRST + 1
        while True:  # ends: fewer streams than ports
            port = self._next_port
            self._next_port = HOST_PORT_FIRST + (port - HOST_PORT_FIRST + 1) % span
            if port not in self._streams:
                return port

    def _shut(self, port: int, flags: Shutdown) -> None:
        stream = self._get(port)
        stream.shut |= flags
        self._flush(port, stream)

    def _apply(self, port: int, stream: _Stream, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Connected):
                self._events.append(Opened(port))
            elif isinstance(event, Refused):
                self._events.append(Rejected(port))
            elif isinstance(event, DataReceived):
                self._events.append(Data(port, event.data))
            elif isinstance(event, CreditAvailable):
                stream.credit_requested = False
            elif isinstance(event, PeerShutdown) and event.flags & Shutdown.SEND:
                self._events.append(EndOfStream(port))
            elif isinstance(event, Reset):
                self._events.append(StreamClosed(port, True, event.reason))
            elif isinstance(event, Closed):
                self._events.append(StreamClosed(port, False))
        if stream.conn.is_open():
            self._flush(port, stream)
        else:
            self._remove(port, stream)

    def _flush(self, port: int, stream: _Stream) -> None:
        conn = stream.conn
        if conn.state == State.ESTABLISHED:
            if conn.peer_shutdown & Shutdown.RCV:
                stream.pending.clear()  # the guest reads no more: like writing to a closed pipe
            elif stream.pending:
                sent = conn.send(bytes(stream.pending))
                del stream.pending[:sent]
                if stream.pending and not conn.peer_free() and not stream.credit_requested:
                    conn.request_credit()
                    stream.credit_requested = True
            todo = stream.shut & ~conn.local_shutdown
            if todo and not stream.pending:
                conn.shutdown(Shutdown(todo))
        self._collect(port, stream)
        if stream.blocked and self.room(port):
            stream.blocked = False
            self._events.append(Writable(port))

    def _collect(self, port: int, stream: _Stream) -> None:
        for packet in stream.conn.packets_to_send():
            stream.out.append(packet)
            stream.out_bytes += len(packet.payload)
        if stream.out and port not in self._ready:
            self._ready.append(port)

    def _remove(self, port: int, stream: _Stream) -> None:
        # Queued data is moot once the stream is gone; only its final RST still matters.
        for packet in stream.conn.packets_to_send():
            if packet.op == Op.RST:
                self._push_control(packet)
        del self._streams[port]
        if port in self._ready:
            self._ready.remove(port)

    def _refuse(self, packet: Packet) -> None:
        answer = refuse(packet)
        if answer is None:
            self.dropped += 1
        else:
            self._push_control(answer)

    def _push_control(self, packet: Packet) -> None:
        if len(self._control) < MAX_CONTROL:
            self._control.append(packet)
        else:
            self.dropped += 1

    def _malformed(self, data: bytes, reason: str) -> None:
        self.dropped += 1
        if len(data) < HEADER_SIZE:
            return
        src_cid, dst_cid, src_port, dst_port = _PORTS.unpack_from(data)
        stream = self._streams.get(dst_port)
        if stream is None or (src_cid, dst_cid, src_port) != (
                self.guest_cid, HOST_CID, stream.conn.peer_port):
            return
        stream.conn.reset()
        self._events.append(StreamClosed(dst_port, True, f"malformed packet: {reason}"))
        self._remove(dst_port, stream)
