"""One virtio-vsock stream, host side, as a sans-IO state machine with credit flow control.

Source: virtio 1.2, 5.10.6 "Device Operation" (5.10.6.3 "Buffer Space Management", 5.10.6.4
"Receive and Transmit", 5.10.6.5 "Stream Sockets"); behaviour cross-checked against Linux
net/vmw_vsock/virtio_transport_common.c (RST answers a full SHUTDOWN).

Theory of operation (after h11): a `Connection` never touches a socket or a virtqueue. Feed
each packet the guest sent for this connection to `receive`, which returns `Event`s; call
`send`, `consumed`, `shutdown`, `reset`, `request_credit` for what the host side does; drain
`packets_to_send` into the guest's RX queue.

States::

    CONNECTING --RESPONSE--> ESTABLISHED        CONNECTING --RST--> CLOSED (Refused)
    ESTABLISHED --shutdown(BOTH)--> CLOSING --RST--> CLOSED (Closed)
    ESTABLISHED --peer SHUTDOWN that completes BOTH--> CLOSED (we answer RST)
    any --reset() or RST or a protocol violation--> CLOSED

Flow control: every packet carries the sender's ``buf_alloc`` (its receive buffer) and
``fwd_cnt`` (bytes its application consumed). We send at most
``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes (the spec's ``peer_free``) and keep the
rest with the caller. Our own buffer is bounded by `buf_alloc`: received-but-unconsumed bytes
(``rx_cnt - fwd_cnt``) never exceed it; a guest that sends beyond the credit we granted is
reset. Counters are u32 and wrap, as on the wire.

Bounded output: control packets (CREDIT_UPDATE) are coalesced into at most one pending, so
a guest flooding CREDIT_REQUEST cannot make the outgoing queue grow.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from hypervisors.vsock.errors import ConnectionStateError
from hypervisors.vsock.packets import HOST_CID, MAX_PAYLOAD, U32, Op, Packet, Shutdown

#: Default receive buffer we grant a guest stream (Linux's default is 256 KiB too).
DEFAULT_BUF_ALLOC = 256 * 1024


class State(enum.Enum):
    """Where the stream is in its life."""

    CONNECTING = "connecting"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class Connected:
    """The guest accepted our REQUEST."""


@dataclass(frozen=True)
class Refused:
    """The guest answered our REQUEST with RST (nobody listens on that port)."""


@dataclass(frozen=True)
class DataReceived:
    """Stream bytes from the guest; call `Connection.consumed` once they are delivered."""

    data: bytes


@dataclass(frozen=True)
class CreditAvailable:
    """The guest granted more credit: `Connection.send` may take ``credit`` bytes now."""

    credit: int


@dataclass(frozen=True)
class PeerShutdown:
    """The guest will no longer send (SEND) and/or receive (RCV)."""

    flags: Shutdown


@dataclass(frozen=True)
class Reset:
    """The stream is gone abnormally: the guest sent RST, or broke the protocol."""

    reason: str
    by_peer: bool


@dataclass(frozen=True)
class Closed:
    """The stream ended in order (both directions shut down)."""


Event = Connected | Refused | DataReceived | CreditAvailable | PeerShutdown | Reset | Closed


def refuse(packet: Packet) -> Packet | None:
    """The RST answer to a packet for no known stream (never an RST to an RST)."""
    if packet.op == Op.RST:
        return None
    return packet.reply(Op.RST)


class Connection:
    """One stream between a host port and a guest port."""

    def __init__(self, local_port: int, peer_cid: int, peer_port: int, *,
                 buf_alloc: int = DEFAULT_BUF_ALLOC, local_cid: int = HOST_CID) -> None:
        """A closed stream; use `connect` or `accept` to start one."""
        if not 0 < buf_alloc <= U32:
            raise ConnectionStateError(f"receive buffer {buf_alloc} is not 1..{U32}")
        self.local_cid, self.local_port = local_cid, local_port
        self.peer_cid, self.peer_port = peer_cid, peer_port
        self.state = State.CLOSED
        self.buf_alloc = buf_alloc
        self.rx_cnt = self.fwd_cnt = self.advertised_fwd_cnt = 0
        self.tx_cnt = self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.local_shutdown = self.peer_shutdown = Shutdown.NONE
        self._out: deque[Packet] = deque()
        self._credit_update_due = False

    @classmethod
    def connect(cls, local_port: int, peer_cid: int, peer_port: int, *,
                buf_alloc: int = DEFAULT_BUF_ALLOC) -> Connection:
        """Host-initiated: queue a REQUEST to the guest port."""
        conn = cls(local_port, peer_cid, peer_port, buf_alloc=buf_alloc)
        conn.state = State.CONNECTING
        conn._queue(Op.REQUEST)
        return conn

    @classmethod
    def accept(cls, request: Packet, *, buf_alloc: int = DEFAULT_BUF_ALLOC) -> Connection:
        """Guest-initiated: take the guest's REQUEST and queue our RESPONSE."""
        if request.op != Op.REQUEST:
            raise ConnectionStateError(f"cannot accept a {request.op.name} packet")
        conn = cls(request.dst_port, request.src_cid, request.src_port, buf_alloc=buf_alloc,
                   local_cid=request.dst_cid)
        conn.state = State.ESTABLISHED
        conn._peer_credit(request)
        conn._queue(Op.RESPONSE)
        return conn

    # -- what the host side does ------------------------------------------------------

    def peer_free(self) -> int:
        """Bytes we may send now (the spec's ``peer_free``, never negative)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def send(self, data: bytes) -> int:
        """Queue as much of `data` as the credit allows as RW packets; return that count."""
        if self.state != State.ESTABLISHED:
            raise ConnectionStateError(f"cannot send on a {self.state.value} stream")
        if self.local_shutdown & Shutdown.SEND or self.peer_shutdown & Shutdown.RCV:
            raise ConnectionStateError("cannot send: the send direction is shut down")
        count = min(len(data), self.peer_free())
        for start in range(0, count, MAX_PAYLOAD):
            chunk = data[start:min(count, start + MAX_PAYLOAD)]
            self._queue(Op.RW, payload=chunk)
            self.tx_cnt = (self.tx_cnt + len(chunk)) & U32
        return count

    def consumed(self, count: int) -> None:
        """The host application took `count` received bytes; may schedule a CREDIT_UPDATE."""
        if not 0 <= count <= self.buffered():
            raise ConnectionStateError(f"consumed {count} bytes, {self.buffered()} buffered")
        self.fwd_cnt = (self.fwd_cnt + count) & U32
        # Tell the guest only when its view of our free space is low (as Linux does), so
        # that a steady stream does not cost a CREDIT_UPDATE per read.
        guest_view = self.buf_alloc - ((self.rx_cnt - self.advertised_fwd_cnt) & U32)
        if self.state == State.ESTABLISHED and self.fwd_cnt != self.advertised_fwd_cnt \
                and guest_view < min(MAX_PAYLOAD, self.buf_alloc // 2 or 1):
            self._credit_update_due = True

    def is_open(self) -> bool:
        """Whether the stream still exists (any state but CLOSED)."""
        return self.state != State.CLOSED

    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return (self.rx_cnt - self.fwd_cnt) & U32

    def request_credit(self) -> None:
        """Ask the guest for its credit (when `peer_free` is 0 and data waits)."""
        self._require_established("request credit")
        self._queue(Op.CREDIT_REQUEST)

    def shutdown(self, flags: Shutdown) -> None:
        """Stop sending (SEND) and/or receiving (RCV); after BOTH wait for the guest's RST."""
        self._require_established("shut down")
        if not flags or flags & ~int(Shutdown.BOTH):
            raise ConnectionStateError(f"bad shutdown flags {flags!r}")
        self.local_shutdown |= flags
        self._queue(Op.SHUTDOWN, flags=int(flags))
        if self.local_shutdown == Shutdown.BOTH:
            self.state = State.CLOSING

    def reset(self) -> None:
        """Abort the stream: queue an RST (unless already closed)."""
        if self.state != State.CLOSED:
            self._queue(Op.RST)
            self.state = State.CLOSED

    def packets_to_send(self) -> list[Packet]:
        """Everything queued for the guest, in order (drains the queue)."""
        packets = list(self._out)
        self._out.clear()
        if self._credit_update_due:
            self._credit_update_due = False
            if self.state in (State.ESTABLISHED, State.CLOSING):
                packets.append(self._packet(Op.CREDIT_UPDATE))
        return packets

    # -- what the guest does ----------------------------------------------------------

    def receive(self, packet: Packet) -> list[Event]:
        """Apply one packet from the guest; returns what happened."""
        if (packet.src_cid, packet.src_port, packet.dst_cid, packet.dst_port) != (
                self.peer_cid, self.peer_port, self.local_cid, self.local_port):
            raise ConnectionStateError(f"packet for {packet.dst_port} from {packet.src_port} "
                                       f"routed to stream {self.local_port}<->{self.peer_port}")
        if self.state == State.CLOSED:
            return []
        if packet.op == Op.RST:
            return self._peer_reset()
        before = self.peer_free()
        self._peer_credit(packet)
        if self.state == State.CONNECTING:
            events = self._receive_connecting(packet)
        else:
            events = self._receive_open(packet)
        if self.is_open() and self.peer_free() > before:
            events.append(CreditAvailable(self.peer_free()))
        return events

    def _receive_connecting(self, packet: Packet) -> list[Event]:
        if packet.op == Op.RESPONSE:
            self.state = State.ESTABLISHED
            return [Connected()]
        return self._violation(f"{packet.op.name} while connecting")

    def _receive_open(self, packet: Packet) -> list[Event]:
        if packet.op == Op.RW:
            return self._receive_data(packet.payload)
        if packet.op == Op.CREDIT_REQUEST:
            self._credit_update_due = True
            return []
        if packet.op == Op.CREDIT_UPDATE:
            return []
        if packet.op == Op.SHUTDOWN:
            return self._receive_shutdown(Shutdown(packet.flags & Shutdown.BOTH))
        return self._violation(f"{packet.op.name} on an open stream")

    def _receive_data(self, data: bytes) -> list[Event]:
        if self.peer_shutdown & Shutdown.SEND:
            return self._violation("data after the guest shut down sending")
        if self.local_shutdown & Shutdown.RCV:
            return self._violation("data after we shut down receiving")
        if len(data) > self.buf_alloc - self.buffered():
            return self._violation(f"{len(data)} bytes sent with only "
                                   f"{self.buf_alloc - self.buffered()} bytes of credit")
        self.rx_cnt = (self.rx_cnt + len(data)) & U32
        return [DataReceived(data)] if data else []

    def _receive_shutdown(self, flags: Shutdown) -> list[Event]:
        self.peer_shutdown |= flags
        events: list[Event] = [PeerShutdown(flags)]
        if self.peer_shutdown == Shutdown.BOTH:
            # The guest is done in both directions: answer with RST and forget the stream
            # (Linux virtio_transport_recv_connected does the same).
            self._queue(Op.RST)
            self.state = State.CLOSED
            events.append(Closed())
        return events

    def _peer_reset(self) -> list[Event]:
        previous, self.state = self.state, State.CLOSED
        if previous == State.CONNECTING:
            return [Refused()]
        if previous == State.CLOSING:
            return [Closed()]
        return [Reset("the guest reset the stream", by_peer=True)]

    def _violation(self, reason: str) -> list[Event]:
        self.reset()
        return [Reset(reason, by_peer=False)]

    def _peer_credit(self, packet: Packet) -> None:
        self.peer_buf_alloc, self.peer_fwd_cnt = packet.buf_alloc, packet.fwd_cnt

    def _require_established(self, what: str) -> None:
        if self.state != State.ESTABLISHED:
            raise ConnectionStateError(f"cannot {what} a {self.state.value} stream")

    def _queue(self, op: Op, *, flags: int = 0, payload: bytes = b"") -> None:
        self._out.append(self._packet(op, flags=flags, payload=payload))

    def _packet(self, op: Op, *, flags: int = 0, payload: bytes = b"") -> Packet:
        # Every packet carries our credit, so each one is also a credit update.
        self.advertised_fwd_cnt = self.fwd_cnt
        return Packet(self.local_cid, self.peer_cid, self.local_port, self.peer_port, op,
                      flags=flags, buf_alloc=self.buf_alloc, fwd_cnt=self.fwd_cnt,
                      payload=payload)
