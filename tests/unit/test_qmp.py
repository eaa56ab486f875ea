"""QMP: the sans-IO core fed whole, byte by byte and with trailing data; the asyncio client
against a fake QMP server on a unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from hypervisors.errors import HypervisorTimeout, QmpCommandError, QmpError
from hypervisors.qmp import EventLog, QmpClient
from hypervisors.qmp_core import (
    NEED_DATA,
    Closed,
    ErrorReply,
    Event,
    Greeting,
    LocalProtocolError,
    Message,
    QmpConnection,
    RemoteProtocolError,
    Return,
    State,
)

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},'
            b' "capabilities": ["oob"]}}\r\n')


def reply(cmd_id: str, value: object) -> bytes:
    return json.dumps({"return": value, "id": cmd_id}).encode() + b"\r\n"


EVENT = (b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "STOP"}\r\n')


def drain(conn: QmpConnection) -> list[Message]:
    out: list[Message] = []
    while (msg := conn.next_event()) is not NEED_DATA:
        assert not isinstance(msg, type(NEED_DATA))
        out.append(msg)
        if isinstance(msg, Closed):
            break
    return out


Feeder = Callable[[QmpConnection, bytes], list[Message]]


def whole(conn: QmpConnection, data: bytes) -> list[Message]:
    conn.receive_data(data)
    return drain(conn)


def bytewise(conn: QmpConnection, data: bytes) -> list[Message]:
    out: list[Message] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        out += drain(conn)
    return out


FEEDERS = [pytest.param(whole, id="whole"), pytest.param(bytewise, id="bytewise")]


def handshake(conn: QmpConnection, feed: Feeder) -> None:
    (greeting,) = feed(conn, GREETING)
    assert isinstance(greeting, Greeting)
    assert greeting.version["qemu"]["major"] == 7
    assert greeting.capabilities == ("oob",)
    assert conn.state is State.GREETED
    cmd_id, data = conn.send_command("qmp_capabilities")
    assert json.loads(data) == {"execute": "qmp_capabilities", "id": cmd_id}
    assert data.endswith(b"\r\n")
    assert conn.state is State.NEGOTIATING
    assert feed(conn, reply(cmd_id, {})) == [Return(cmd_id, "qmp_capabilities", {})]
    assert conn.state is State.READY


@pytest.mark.parametrize("feed", FEEDERS)
def test_session(feed: Feeder) -> None:
    conn = QmpConnection()
    handshake(conn, feed)
    a, _ = conn.send_command("query-status")
    b, data_b = conn.send_command("device_del", {"id": "x"})
    assert json.loads(data_b)["arguments"] == {"id": "x"}
    assert conn.pending == (a, b)
    err = json.dumps({"error": {"class": "DeviceNotFound", "desc": "no x"}, "id": b}).encode()
    msgs = feed(conn, EVENT + err + b"\r\n" + reply(a, {"status": "running", "running": True}))
    assert msgs == [
        Event("STOP", {}, 10.5),
        ErrorReply(b, "device_del", "DeviceNotFound", "no x"),
        Return(a, "query-status", {"status": "running", "running": True}),
    ]
    assert conn.pending == ()
    q, _ = conn.send_command("quit")
    assert whole(conn, b"") == [Closed((q,))]
    assert conn.state is State.CLOSED
    assert conn.next_event() is NEED_DATA


def test_trailing_data_stays_buffered() -> None:
    conn = QmpConnection()
    conn.receive_data(GREETING + b'{"event": "RESU')
    assert isinstance(conn.next_event(), Greeting)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b'ME"}\n')
    assert conn.next_event() == Event("RESUME")
    assert conn.next_event() is NEED_DATA


def test_blank_lines_and_bare_newlines() -> None:
    conn = QmpConnection()
    assert whole(conn, b"\r\n\n" + GREETING.replace(b"\r\n", b"\n")) != []


def test_eof_inside_message() -> None:
    conn = QmpConnection()
    conn.receive_data(GREETING[:20])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="end of file inside a message"):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):  # sticky
        conn.next_event()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not json\n", "failed to parse"),
        (b"[1, 2]\n", "not an object"),
        (b'{"foo": 1}\n', "unknown kind"),
        (EVENT, "unexpected Event in state await-greeting"),
        (GREETING + GREETING, "unexpected Greeting in state greeted"),
        (GREETING + b'{"return": {}, "id": "nope"}\n', "unknown id 'nope'"),
        (GREETING + b'{"return": {}}\n', "unknown id None"),
        (b'{"event": 5}\n', "not a string"),
    ],
)
def test_remote_errors(data: bytes, words: str) -> None:
    conn = QmpConnection()
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=words):
        drain(conn)
    assert conn.state is State.ERROR


def test_line_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hypervisors.qmp_core.MAX_LINE", 10)
    conn = QmpConnection()
    conn.receive_data(b"{" * 11)
    with pytest.raises(RemoteProtocolError, match="longer than"):
        conn.next_event()


def test_local_errors() -> None:
    conn = QmpConnection()
    with pytest.raises(LocalProtocolError, match="not allowed in state await-greeting"):
        conn.send_command("qmp_capabilities")
    whole(conn, GREETING)
    with pytest.raises(LocalProtocolError, match="query-status: not allowed in state greeted"):
        conn.send_command("query-status")
    handshake_id, _ = conn.send_command("qmp_capabilities")
    whole(conn, reply(handshake_id, {}))
    with pytest.raises(LocalProtocolError):
        conn.send_command("qmp_capabilities")
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="end of file"):
        conn.receive_data(b"x")


def test_capabilities_refused_is_error_state() -> None:
    conn = QmpConnection()
    whole(conn, GREETING)
    cid, _ = conn.send_command("qmp_capabilities")
    err = {"error": {"class": "CommandNotFound", "desc": "x"}, "id": cid}
    conn.receive_data(json.dumps(err).encode() + b"\n")
    assert isinstance(conn.next_event(), ErrorReply)
    assert conn.state is State.ERROR


# -- asyncio client against a fake server ----------------------------------------------------


async def fake_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers like QEMU: greeting, then per command; 'hang' is never answered."""
    writer.write(GREETING)
    while line := await reader.readline():
        msg = json.loads(line)
        cmd, cmd_id = msg["execute"], msg["id"]
        if cmd == "hang":
            continue
        if cmd == "quit":
            writer.write(reply(cmd_id, {}) + b'{"event": "SHUTDOWN", "data": {"guest": false}}\n')
            await writer.drain()
            break
        if cmd == "query-status":
            writer.write(EVENT + reply(cmd_id, {"status": "running", "running": True}))
        elif cmd == "qmp_capabilities":
            writer.write(reply(cmd_id, {}))
        else:
            writer.write(json.dumps({"error": {"class": "CommandNotFound", "desc": cmd},
                                     "id": cmd_id}).encode() + b"\r\n")
        await writer.drain()
    writer.close()


def test_client_session(tmp_path: Path) -> None:
    asyncio.run(client_session(tmp_path))


async def client_session(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"

    async def later() -> asyncio.Server:
        await asyncio.sleep(0.1)  # connect must retry while the socket is missing
        return await asyncio.start_unix_server(fake_qemu, str(path))

    server_task = asyncio.create_task(later())
    client = await QmpClient.connect(path, timeout=5)
    server = await server_task
    try:
        assert await client.query_status() == "running"
        assert [e.name for e in client.events.recent()] == ["STOP"]
        with pytest.raises(QmpCommandError, match="CommandNotFound: frobnicate") as info:
            await client.execute("frobnicate", {"a": 1})
        assert info.value.error_class == "CommandNotFound"
        with pytest.raises(HypervisorTimeout, match=r"hang: no reply within 0\.1s"):
            await client.execute("hang", timeout=0.1)
        mark = client.events.mark()
        await client.quit()
        await client.wait_closed(2)
        assert client.closed
        assert (await client.events.wait_for({"SHUTDOWN"}, 1, after=mark)).name == "SHUTDOWN"
        with pytest.raises(QmpError, match="connection closed"):
            await client.execute("query-status")
    finally:
        await client.close()
        await client.close()  # idempotent
        server.close()
        await server.wait_closed()


def test_connect_timeout(tmp_path: Path) -> None:
    with pytest.raises(HypervisorTimeout, match=r"failed to connect QMP .*0\.2s"):
        asyncio.run(QmpClient.connect(tmp_path / "none.sock", timeout=0.2))


def test_connect_peer_closes_before_greeting(tmp_path: Path) -> None:
    asyncio.run(peer_closes_before_greeting(tmp_path))


async def peer_closes_before_greeting(tmp_path: Path) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    path = tmp_path / "q.sock"
    server = await asyncio.start_unix_server(rude, str(path))
    try:
        with pytest.raises(QmpError, match="closed by the VMM"):
            await QmpClient.connect(path, timeout=2)
    finally:
        server.close()
        await server.wait_closed()


# -- fd passing and the bounded event log -----------------------------------------------------


def fd_receiving_qemu(listener: socket.socket, received: list[tuple[str, bytes]]) -> None:
    """A QMP peer in a thread: greets, answers, and reads the fd each getfd carries."""
    conn, _ = listener.accept()
    with conn:
        conn.sendall(GREETING)
        buffered = b""
        while True:
            data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
            if not data:
                return
            for fd in fds:
                with os.fdopen(fd, "rb") as f:
                    received.append(("fd", f.read()))
            buffered += data
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                msg = json.loads(line)
                received.append(("cmd", msg["execute"].encode()))
                conn.sendall(reply(msg["id"], {}))


def test_get_fd_sends_the_descriptor_with_the_command(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    received: list[tuple[str, bytes]] = []
    peer = threading.Thread(target=fd_receiving_qemu, args=(listener, received))
    peer.start()
    secret = tmp_path / "tap"
    secret.write_bytes(b"the tap's bytes")

    async def run() -> None:
        client = await QmpClient.connect(path, timeout=5)
        try:
            with open(secret, "rb") as f:
                await client.get_fd("tap0", f.fileno())
            await client.execute("query-status")
        finally:
            await client.close()

    try:
        asyncio.run(run())
    finally:
        peer.join(5)
        listener.close()
    assert received == [("cmd", b"qmp_capabilities"), ("fd", b"the tap's bytes"),
                        ("cmd", b"getfd"), ("cmd", b"query-status")]


def test_event_log_is_bounded_and_waitable() -> None:
    async def run() -> None:
        log = EventLog(capacity=3)
        for i in range(5):
            log.append(Event(f"E{i}"))
        assert [e.name for e in log.recent()] == ["E2", "E3", "E4"] and log.dropped == 2
        mark = log.mark()
        waiter = asyncio.ensure_future(log.wait_for({"RESUME"}, 1))
        await asyncio.sleep(0)
        log.append(Event("STOP"))
        log.append(Event("RESUME", {"x": 1}))
        assert (await waiter).data == {"x": 1}
        # An event that came before the wait began is found through the mark.
        assert (await log.wait_for({"STOP"}, 1, after=mark)).name == "STOP"
        with pytest.raises(HypervisorTimeout, match=r"none in 0\.05s"):
            await log.wait_for({"NEVER"}, 0.05)
        late = asyncio.ensure_future(log.wait_for({"NEVER"}, 5))
        await asyncio.sleep(0)
        log.fail(QmpError("gone"))
        with pytest.raises(QmpError, match="gone"):
            await late

    asyncio.run(run())
