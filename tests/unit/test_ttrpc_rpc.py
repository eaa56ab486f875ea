"""ttrpc client <-> server over real unix socket pairs (and pipes), with plain asyncio.run."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2, wrappers_pb2
from google.protobuf.message import Message

from protocols import rpc_status_pb2, ttrpc_pb2
from ttrpc import Client, Code, Server, TtrpcError
from ttrpc.channel import pipe_streams
from ttrpc.frames import MAX_PAYLOAD, Frame, FrameDecoder, MessageType, encode_frame
from ttrpc.server import RequestInfo, current_request

SERVICE = "test.v1.Echo"
StringValue = wrappers_pb2.StringValue
Empty = empty_pb2.Empty


class EchoService:
    """Handlers for the test service; events let tests orchestrate concurrency."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.slow_cancelled = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.seen: list[RequestInfo] = []

    async def echo(self, request: StringValue) -> StringValue:
        self.seen.append(current_request())
        return StringValue(value=request.value)

    async def slow(self, request: StringValue) -> StringValue:
        self.slow_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        return StringValue(value="slow:" + request.value)

    async def fast(self, request: StringValue) -> StringValue:
        self.release.set()
        return StringValue(value="fast:" + request.value)

    async def fail(self, request: StringValue) -> Empty:
        raise TtrpcError(Code.NOT_FOUND, f"no such thing: {request.value}")

    async def boom(self, request: StringValue) -> Empty:
        raise RuntimeError("kaboom")

    async def big(self, request: wrappers_pb2.Int64Value) -> wrappers_pb2.BytesValue:
        return wrappers_pb2.BytesValue(value=b"b" * request.value)

    async def encoded(self, request: wrappers_pb2.Int64Value) -> bytes:
        """An answer the handler encoded itself (as the agent's stream reads do)."""
        return wrappers_pb2.BytesValue(value=b"e" * request.value).SerializeToString()

    def server(self) -> Server:
        server = Server()
        methods: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message | bytes]]]] = {
            "Echo": (StringValue, self.echo),
            "Slow": (StringValue, self.slow),
            "Fast": (StringValue, self.fast),
            "Fail": (StringValue, self.fail),
            "Boom": (StringValue, self.boom),
            "Big": (wrappers_pb2.Int64Value, self.big),
            "Encoded": (wrappers_pb2.Int64Value, self.encoded),
        }
        server.register(SERVICE, methods)
        return server


async def socket_pair(
    server: Server,
) -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], asyncio.Task[None]]:
    """Client-side streams of a socketpair whose other end the server serves."""
    client_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_streams = await asyncio.open_unix_connection(sock=server_sock)
    task = asyncio.create_task(server.serve_connection(*server_streams))
    return await asyncio.open_unix_connection(sock=client_sock), task


def run(test: Callable[[EchoService], Coroutine[Any, Any, None]]) -> None:
    """Run an async test with a fresh service and a hard 10 s cap."""

    async def main() -> None:
        await asyncio.wait_for(test(EchoService()), 10)

    asyncio.run(main())


async def connected(service: EchoService) -> tuple[Client, asyncio.Task[None]]:
    streams, task = await socket_pair(service.server())
    return Client(*streams), task


async def raw_exchange(
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes
) -> Frame:
    """Write raw bytes, return the next response frame."""
    reader, writer = streams
    writer.write(data)
    await writer.drain()
    decoder = FrameDecoder()
    while True:
        decoder.feed(await reader.read(65536))
        event = decoder.next_event()
        if event is not None:
            assert isinstance(event, Frame)
            return event


def request_frame(stream_id: int, method: str, payload: bytes) -> bytes:
    request = ttrpc_pb2.Request(service=SERVICE, method=method, payload=payload)
    return encode_frame(stream_id, MessageType.REQUEST, request.SerializeToString())


def status_of(frame: Frame) -> rpc_status_pb2.Status:
    assert frame.type is MessageType.RESPONSE
    return ttrpc_pb2.Response.FromString(frame.payload).status


def test_unary_round_trip_with_metadata() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        metadata = {"containerd-namespace-ttrpc": "k8s.io"}
        reply = await client.call(
            SERVICE, "Echo", StringValue(value="hi"), StringValue, timeout=5, metadata=metadata
        )
        assert reply.value == "hi"
        info = svc.seen[0]
        assert (info.service, info.method) == (SERVICE, "Echo")
        assert info.metadata == {"containerd-namespace-ttrpc": ("k8s.io",)}
        assert info.timeout_nano == 5_000_000_000
        await client.close()

    run(body)


@pytest.mark.parametrize("size", [0, 1, 300, 1 << 20])
def test_a_handler_may_answer_with_its_encoding(size: int) -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        reply = await client.call(SERVICE, "Encoded", wrappers_pb2.Int64Value(value=size),
                                  wrappers_pb2.BytesValue)
        assert reply.value == b"e" * size
        await client.close()

    run(body)


def test_slow_call_does_not_block_a_fast_one() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        slow = asyncio.create_task(
            client.call(SERVICE, "Slow", StringValue(value="1"), StringValue)
        )
        await svc.slow_started.wait()
        fast = await client.call(SERVICE, "Fast", StringValue(value="2"), StringValue)
        assert fast.value == "fast:2"
        assert (await slow).value == "slow:1"
        await client.close()

    run(body)


def test_many_concurrent_calls_are_multiplexed() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        calls = [
            client.call(SERVICE, "Echo", StringValue(value=str(i)), StringValue) for i in range(200)
        ]
        replies = await asyncio.gather(*calls)
        assert [r.value for r in replies] == [str(i) for i in range(200)]
        await client.close()

    run(body)


@pytest.mark.parametrize(("service", "method"), [(SERVICE, "Nope"), ("no.such.Service", "Echo")])
def test_unknown_service_or_method_is_unimplemented(service: str, method: str) -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        with pytest.raises(TtrpcError) as err:
            await client.call(service, method, StringValue(), StringValue)
        assert err.value.code is Code.UNIMPLEMENTED
        await client.close()

    run(body)


def test_handler_errors_map_to_status() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Fail", StringValue(value="x"), Empty)
        assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "no such thing: x")
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Boom", StringValue(), Empty)
        assert (err.value.code, err.value.message) == (Code.UNKNOWN, "kaboom")
        await client.close()

    run(body)


def test_undecodable_request_payload_is_invalid_argument() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        bad_utf8 = wrappers_pb2.BytesValue(value=b"\xff\xfe")  # not a valid StringValue
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Echo", bad_utf8, StringValue)
        assert err.value.code is Code.INVALID_ARGUMENT
        await client.close()

    run(body)


def test_raw_protocol_violations_get_statuses_and_the_connection_survives() -> None:
    async def body(svc: EchoService) -> None:
        streams, _ = await socket_pair(svc.server())
        even = await raw_exchange(streams, request_frame(2, "Echo", b""))
        assert (even.stream_id, status_of(even).code) == (2, Code.INVALID_ARGUMENT)
        garbage = await raw_exchange(streams, encode_frame(3, MessageType.REQUEST, b"\xff\xff"))
        assert (garbage.stream_id, status_of(garbage).code) == (3, Code.INVALID_ARGUMENT)
        oversized = struct.pack(">IIBB", MAX_PAYLOAD + 10, 5, 1, 0) + b"\0" * (MAX_PAYLOAD + 10)
        big = await raw_exchange(streams, oversized)
        assert (big.stream_id, status_of(big).code) == (5, Code.RESOURCE_EXHAUSTED)
        payload = StringValue(value="still here").SerializeToString()
        data = encode_frame(9, MessageType.DATA, b"ignored") + request_frame(7, "Echo", payload)
        ok = await raw_exchange(streams, data)
        assert ok.stream_id == 7 and not ok.payload.startswith(b"\x0a")  # no status field
        assert (
            StringValue.FromString(ttrpc_pb2.Response.FromString(ok.payload).payload).value
            == "still here"
        )
        streams[1].close()

    run(body)


def test_oversized_messages_are_resource_exhausted_and_the_connection_survives() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        huge = StringValue(value="x" * (MAX_PAYLOAD + 1))
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Echo", huge, StringValue)
        assert err.value.code is Code.RESOURCE_EXHAUSTED
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Big", wrappers_pb2.Int64Value(value=MAX_PAYLOAD), Empty)
        assert err.value.code is Code.RESOURCE_EXHAUSTED
        reply = await client.call(SERVICE, "Echo", StringValue(value="ok"), StringValue)
        assert reply.value == "ok"
        await client.close()

    run(body)


def test_timeout_is_deadline_exceeded_and_late_answers_are_dropped() -> None:
    async def body(svc: EchoService) -> None:
        client, _ = await connected(svc)
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Slow", StringValue(), StringValue, timeout=0.05)
        assert err.value.code is Code.DEADLINE_EXCEEDED
        svc.release.set()  # the server now answers the abandoned stream
        reply = await client.call(SERVICE, "Echo", StringValue(value="after"), StringValue)
        assert reply.value == "after"
        assert not client.closed.is_set()
        await client.close()

    run(body)


def test_server_going_away_fails_pending_calls_unavailable_and_cancels_handlers() -> None:
    async def body(svc: EchoService) -> None:
        client, server_task = await connected(svc)
        pending = asyncio.create_task(client.call(SERVICE, "Slow", StringValue(), StringValue))
        await svc.slow_started.wait()
        server_task.cancel()
        with pytest.raises(TtrpcError) as err:
            await pending
        assert err.value.code is Code.UNAVAILABLE
        assert svc.slow_cancelled.is_set()
        await asyncio.wait_for(client.closed.wait(), 1)
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Echo", StringValue(), StringValue)
        assert err.value.code is Code.UNAVAILABLE
        await client.close()

    run(body)


def test_client_close_fails_pending_calls_and_server_cancels_handlers() -> None:
    async def body(svc: EchoService) -> None:
        client, server_task = await connected(svc)
        pending = asyncio.create_task(client.call(SERVICE, "Slow", StringValue(), StringValue))
        await svc.slow_started.wait()
        await client.close()
        with pytest.raises(TtrpcError) as err:
            await pending
        assert err.value.code is Code.UNAVAILABLE
        await asyncio.wait_for(server_task, 2)  # server saw EOF and finished
        assert svc.slow_cancelled.is_set()
        await client.close()  # idempotent

    run(body)


def test_serve_listener_and_connect_unix() -> None:
    async def body(svc: EchoService) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "ttrpc.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen()
            serving = asyncio.create_task(svc.server().serve_listener(listener))
            clients = [await Client.connect_unix(path) for _ in range(2)]
            for i, client in enumerate(clients):
                reply = await client.call(SERVICE, "Echo", StringValue(value=str(i)), StringValue)
                assert reply.value == str(i)
            serving.cancel()
            await asyncio.wait([serving])
            for client in clients:  # the listener closed its connections
                await asyncio.wait_for(client.closed.wait(), 2)
                await client.close()
            with pytest.raises(TtrpcError) as err:
                await Client.connect_unix(path + ".missing")
            assert err.value.code is Code.UNAVAILABLE

    run(body)


def test_works_over_pipes_like_a_character_device() -> None:
    async def body(svc: EchoService) -> None:
        to_server_r, to_server_w = os.pipe()
        to_client_r, to_client_w = os.pipe()
        server_streams = await pipe_streams(to_server_r, to_client_w)
        server_task = asyncio.create_task(svc.server().serve_connection(*server_streams))
        client = Client(*await pipe_streams(to_client_r, to_server_w))
        slow = asyncio.create_task(
            client.call(SERVICE, "Slow", StringValue(value="a"), StringValue)
        )
        await svc.slow_started.wait()
        assert (
            await client.call(SERVICE, "Fast", StringValue(value="b"), StringValue)
        ).value == "fast:b"
        assert (await slow).value == "slow:a"
        await client.close()
        await asyncio.wait_for(server_task, 2)

    run(body)


def test_code_from_wire_and_error_repr() -> None:
    assert Code.from_wire(5) is Code.NOT_FOUND
    assert Code.from_wire(99) is Code.UNKNOWN
    err = TtrpcError(Code.NOT_FOUND, "gone")
    assert str(err) == "NOT_FOUND: gone"
    assert repr(err) == "TtrpcError(<Code.NOT_FOUND: 5>, 'gone')"


def test_register_refuses_duplicates() -> None:
    server = EchoService().server()
    with pytest.raises(ValueError, match="already registered"):
        server.register(SERVICE, {"Echo": (StringValue, EchoService().echo)})
