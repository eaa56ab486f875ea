"""QMP (QEMU Machine Protocol) client side as a sans-IO state machine.

Theory of operation (after h11): `QmpConnection` never touches a socket. Feed it what the
socket gave with `receive_data` (``b""`` means end of file), then call `next_event` until it
returns `NEED_DATA`; each call yields one `Greeting`, `Return`, `ErrorReply`, `Event` or
`Closed`. `send_command` returns the bytes to write and the id the reply will carry.

Wire format: QEMU sends one JSON object per line (``\\r\\n`` terminated). The first is the
greeting ``{"QMP": {"version": ..., "capabilities": [...]}}``. The client must then send
``qmp_capabilities``; until its reply arrives no other command is accepted. Replies are
``{"return": ..., "id": ...}`` or ``{"error": {"class": ..., "desc": ...}, "id": ...}`` and
asynchronous ``{"event": ..., "data": ..., "timestamp": {...}}`` may arrive at any time.
We always send an id and require it back, so replies are matched by id, never by order;
except that a VMM which leaves the id out of some replies (StratoVirt answers
``qmp_capabilities`` and unparsable input without one) is served with ``untagged_replies``:
such a reply answers the oldest pending command, as replies come in order.

States (the tables below are the whole machine)::

    AWAIT_GREETING --Greeting--> GREETED --send qmp_capabilities--> NEGOTIATING
    NEGOTIATING --Return(caps id)--> READY        any state --EOF--> CLOSED
    any state --malformed or unexpected input--> ERROR (sticky)

Errors: input the peer got wrong raises `RemoteProtocolError` (and the state becomes ERROR);
calls this side got wrong raise `LocalProtocolError`. Both are `QmpError`s.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypervisors.errors import QmpError

#: Longest line we accept from QEMU (query replies are small; this bounds memory).
MAX_LINE = 16 * 1024 * 1024
CAPABILITIES_COMMAND = "qmp_capabilities"


class LocalProtocolError(QmpError):
    """This side used the connection wrongly (e.g. a command before the handshake)."""


class RemoteProtocolError(QmpError):
    """QEMU sent something that is not valid QMP here."""


class State(enum.Enum):
    """Where the connection is in its life."""

    AWAIT_GREETING = "await-greeting"
    GREETED = "greeted"
    NEGOTIATING = "negotiating"
    READY = "ready"
    CLOSED = "closed"
    ERROR = "error"


class NeedData(enum.Enum):
    """Returned by `QmpConnection.next_event` when more bytes are needed."""

    NEED_DATA = "need-data"


NEED_DATA = NeedData.NEED_DATA


@dataclass(frozen=True)
class Greeting:
    """QEMU's first message."""

    version: Mapping[str, Any]
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class Return:
    """Successful reply to the command with this id."""

    id: str
    command: str
    value: Any


@dataclass(frozen=True)
class ErrorReply:
    """Failed reply to the command with this id."""

    id: str
    command: str
    error_class: str
    desc: str


@dataclass(frozen=True)
class Event:
    """Asynchronous event (e.g. SHUTDOWN, STOP)."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


@dataclass(frozen=True)
class Closed:
    """End of file; ``pending`` lists ids of commands that got no reply."""

    pending: tuple[str, ...]


Message = Greeting | Return | ErrorReply | Event | Closed

#: Which received message types are legal in each state.
RECEIVE_ALLOWED: dict[State, tuple[type, ...]] = {
    State.AWAIT_GREETING: (Greeting,),
    State.GREETED: (Event,),
    State.NEGOTIATING: (Return, ErrorReply, Event),
    State.READY: (Return, ErrorReply, Event),
}


class QmpConnection:
    """Sans-IO QMP client connection."""

    def __init__(self, id_prefix: str = "kpy", untagged_replies: bool = False) -> None:
        """Start in AWAIT_GREETING with an empty buffer."""
        self.untagged_replies = untagged_replies
        self.state = State.AWAIT_GREETING
        self._buffer = bytearray()
        self._eof = False
        self._pending: dict[str, str] = {}  # id -> command name
        self._counter = 0
        self._prefix = id_prefix
        self._caps_id: str | None = None

    # -- sending -------------------------------------------------------------------------

    def send_command(
        self, command: str, arguments: Mapping[str, Any] | None = None
    ) -> tuple[str, bytes]:
        """Return ``(id, bytes to write)`` for ``command``; its reply will carry ``id``."""
        if self.state is State.GREETED and command == CAPABILITIES_COMMAND:
            next_state = State.NEGOTIATING
        elif self.state is State.READY and command != CAPABILITIES_COMMAND:
            next_state = State.READY
        else:
            raise LocalProtocolError(
                f"failed to send QMP command {command}: not allowed in state {self.state.value}"
            )
        self._counter += 1
        cmd_id = f"{self._prefix}-{self._counter}"
        msg: dict[str, Any] = {"execute": command, "id": cmd_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._pending[cmd_id] = command
        if next_state is State.NEGOTIATING:
            self._caps_id = cmd_id
        self.state = next_state
        return cmd_id, json.dumps(msg).encode() + b"\r\n"

    @property
    def pending(self) -> tuple[str, ...]:
        """Ids of commands sent and not yet answered."""
        return tuple(self._pending)

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` marks end of file."""
        if self._eof and data:
            raise LocalProtocolError("failed to receive QMP data: already at end of file")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Message | NeedData:
        """Return the next complete message, `NEED_DATA`, or `Closed` after EOF."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("failed to read QMP: connection is in the error state")
        if self.state is State.CLOSED:
            return NEED_DATA
        try:
            line = self._next_line()
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    return Closed(self.pending)
                return NEED_DATA
            return self._apply(self._parse(line))
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _next_line(self) -> bytes | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    raise RemoteProtocolError("failed to read QMP: line longer than MAX_LINE")
                if self._eof and self._buffer.strip():
                    raise RemoteProtocolError("failed to read QMP: end of file inside a message")
                return None
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if line:
                return line

    def _parse(self, line: bytes) -> Message:
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise RemoteProtocolError(f"failed to parse QMP message {line[:80]!r}: {exc}") from exc
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"failed to parse QMP message {line[:80]!r}: not an object")
        if "QMP" in obj:
            qmp = obj["QMP"] if isinstance(obj["QMP"], dict) else {}
            return Greeting(qmp.get("version", {}), tuple(qmp.get("capabilities", ())))
        if "event" in obj:
            return _event(obj)
        if "return" in obj or "error" in obj:
            return self._reply(obj)
        raise RemoteProtocolError(f"failed to parse QMP message {line[:80]!r}: unknown kind")

    def _reply(self, obj: dict[str, Any]) -> Return | ErrorReply:
        cmd_id = obj.get("id")
        if cmd_id is None and self.untagged_replies and self._pending:
            cmd_id = next(iter(self._pending))  # the oldest: replies come in order
        if not isinstance(cmd_id, str) or cmd_id not in self._pending:
            raise RemoteProtocolError(f"failed to match QMP reply: unknown id {cmd_id!r}")
        command = self._pending[cmd_id]
        if "return" in obj:
            return Return(cmd_id, command, obj["return"])
        err = obj["error"] if isinstance(obj["error"], dict) else {}
        return ErrorReply(cmd_id, command, str(err.get("class", "")), str(err.get("desc", "")))

    def _apply(self, msg: Message) -> Message:
        allowed = RECEIVE_ALLOWED.get(self.state, ())
        if not isinstance(msg, allowed):
            raise RemoteProtocolError(
                f"failed to read QMP: unexpected {type(msg).__name__} in state {self.state.value}"
            )
        if isinstance(msg, Greeting):
            self.state = State.GREETED
        elif isinstance(msg, Return | ErrorReply):
            del self._pending[msg.id]
            if msg.id == self._caps_id:
                self._caps_id = None
                self.state = State.READY if isinstance(msg, Return) else State.ERROR
        return msg


def _event(obj: dict[str, Any]) -> Event:
    name = obj["event"]
    if not isinstance(name, str):
        raise RemoteProtocolError(f"failed to parse QMP event: name {name!r} is not a string")
    data = obj.get("data", {})
    ts = obj.get("timestamp", {})
    stamp = 0.0
    if isinstance(ts, dict):
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
    return Event(name, data if isinstance(data, dict) else {}, stamp)
