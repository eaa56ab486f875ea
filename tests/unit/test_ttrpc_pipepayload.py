"""ttrpc.pipepayload: answers whose bulk is spliced from a pipe, over sockets and pipes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import tempfile
import termios
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from google.protobuf import wrappers_pb2

from ttrpc import Client, Server
from ttrpc.channel import FrameChannel, pipe_streams
from ttrpc.frames import MAX_PAYLOAD, FrameTooLargeError, MessageType
from ttrpc.pipepayload import PipePayload, move
from ttrpc.wire import field_prefix

SERVICE = "test.v1.Pipes"
BytesValue = wrappers_pb2.BytesValue
Int64Value = wrappers_pb2.Int64Value


def pattern(size: int, start: int = 0) -> bytes:
    """Bytes that differ from place to place, so that a lost or repeated piece shows."""
    return bytes((start + i * 7) % 251 for i in range(size))


class PipeService:
    """Spliced answers of what a test wrote into ``pipe``; counts releases."""

    def __init__(self) -> None:
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_r, False)  # as the agent's ends are
        fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, 1 << 20)  # as the agent widens them
        self.released = 0

    async def spliced(self, request: Int64Value) -> PipePayload:
        held = os.dup(self.pipe_r)

        def release() -> None:
            os.close(held)
            self.released += 1

        payload = PipePayload(held, request.value, release)
        payload.head = field_prefix(1, payload.size)  # BytesValue{value = 1}
        return payload

    async def small(self, request: Int64Value) -> BytesValue:
        return BytesValue(value=b"s" * request.value)

    def server(self) -> Server:
        server = Server()
        server.register(SERVICE, {"Spliced": (Int64Value, self.spliced),
                                  "Small": (Int64Value, self.small)})
        return server

    def close(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)


Connect = Callable[[Server], Coroutine[Any, Any, Client]]
#: Server tasks of the running test (asyncio keeps only weak references to tasks).
SERVING: set[asyncio.Task[None]] = set()


async def over_socket(server: Server) -> Client:
    client_sock, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    streams = await asyncio.open_unix_connection(sock=server_sock)
    SERVING.add(asyncio.create_task(server.serve_connection(*streams)))
    return Client(*await asyncio.open_unix_connection(sock=client_sock))


async def over_pipes(server: Server) -> Client:
    """As the agent's virtio-serial port: a read and a write pipe transport."""
    to_server_r, to_server_w = os.pipe()
    to_client_r, to_client_w = os.pipe()
    streams = await pipe_streams(to_server_r, to_client_w)
    SERVING.add(asyncio.create_task(server.serve_connection(*streams)))
    return Client(*await pipe_streams(to_client_r, to_server_w))


def run(connect: Connect, test: Callable[[PipeService, Client], Coroutine[Any, Any, None]]
        ) -> None:
    async def main() -> None:
        svc = PipeService()
        client = await connect(svc.server())
        try:
            await asyncio.wait_for(test(svc, client), 20)
        finally:
            await client.close()
            svc.close()
            SERVING.clear()

    asyncio.run(main())


def queued(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


async def write(fd: int, data: bytes) -> None:
    await asyncio.get_running_loop().run_in_executor(None, os.write, fd, data)


@pytest.mark.parametrize("connect", [over_socket, over_pipes])
@pytest.mark.parametrize("size", [1, 300, 70_000, (1 << 20) - 1000])
def test_the_bulk_arrives_whole_and_what_follows_stays_in_the_pipe(
        connect: Connect, size: int) -> None:
    async def body(svc: PipeService, client: Client) -> None:
        data = pattern(size + 1000)  # the pipe holds more than the answer takes
        await write(svc.pipe_w, data)
        reply = await client.call(SERVICE, "Spliced", Int64Value(value=size), BytesValue)
        assert reply.value == data[:size]
        assert os.read(svc.pipe_r, 5000) == data[size:]
        assert svc.released == 1

    run(connect, body)


@pytest.mark.parametrize("connect", [over_socket, over_pipes])
def test_spliced_and_plain_answers_interleave_whole(connect: Connect) -> None:
    """Many spliced answers, each racing plain ones on the same connection: no frame is
    cut into another, none is lost."""
    async def body(svc: PipeService, client: Client) -> None:
        sizes = [1, 4096, 65_537, 200_000, 3, 131_072] * 3
        data = pattern(sum(sizes))
        writer = asyncio.create_task(write(svc.pipe_w, data))
        got = bytearray()
        for size in sizes:
            spliced = client.call(SERVICE, "Spliced", Int64Value(value=size), BytesValue)
            smalls = [client.call(SERVICE, "Small", Int64Value(value=n), BytesValue)
                      for n in (0, 10, 5000)]
            while queued(svc.pipe_r) < size:
                await asyncio.sleep(0.001)  # the answer promises bytes the pipe holds
            replies = await asyncio.gather(spliced, *smalls)
            got += replies[0].value
            assert [r.value for r in replies[1:]] == [b"", b"s" * 10, b"s" * 5000]
        await writer
        assert bytes(got) == data
        assert svc.released == len(sizes)

    run(connect, body)


def test_a_payload_over_the_frame_limit_is_refused_before_anything_is_written() -> None:
    async def body(svc: PipeService, client: Client) -> None:
        from ttrpc import TtrpcError

        with pytest.raises(TtrpcError, match="exceeds"):
            await client.call(SERVICE, "Spliced", Int64Value(value=MAX_PAYLOAD), BytesValue)
        assert svc.released == 1
        await write(svc.pipe_w, b"next")
        assert (await client.call(SERVICE, "Spliced", Int64Value(value=4), BytesValue)
                ).value == b"next"  # the connection is still in step

    run(over_socket, body)


def test_move_reads_and_writes_where_the_target_takes_no_splice() -> None:
    """splice(2) refuses a file opened for appending (EINVAL): the bulk is copied instead."""
    async def main() -> None:
        r, w = os.pipe()
        data = pattern(100_000)
        writer = asyncio.get_running_loop().run_in_executor(None, os.write, w, data)
        with tempfile.TemporaryFile() as f:
            out = os.open(f"/proc/self/fd/{f.fileno()}", os.O_WRONLY | os.O_APPEND)
            try:
                while queued(r) < 65536:  # what the pipe holds at once
                    await asyncio.sleep(0.001)
                await move(r, out, 65536)
                await writer
                await move(r, out, len(data) - 65536)
            finally:
                os.close(out)
            f.seek(0)
            assert f.read() == data
        os.close(r)
        os.close(w)

    asyncio.run(main())


def test_move_fails_when_the_pipe_ends_before_the_size_it_promised() -> None:
    async def main() -> None:
        r, w = os.pipe()
        a, b = socket.socketpair()
        os.write(w, b"short")
        os.close(w)
        with pytest.raises(EOFError, match="ended 5 bytes before the 10"):
            await move(r, a.fileno(), 10)
        assert b.recv(100) == b"short"
        for s in (a, b):
            s.close()
        os.close(r)

    asyncio.run(main())


def test_channel_refuses_an_oversized_pipe_payload_and_an_empty_one() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        channel = FrameChannel(*await asyncio.open_unix_connection(sock=a), max_payload=100)
        r, w = os.pipe()
        payload = PipePayload(r, 99, lambda: None, head=b"xy")
        with pytest.raises(FrameTooLargeError):
            await channel.send_pipe_payload(1, MessageType.RESPONSE, b"", payload)
        with pytest.raises(ValueError, match="at least one byte"):
            PipePayload(r, 0, lambda: None)
        channel.abort()
        b.close()
        os.close(r)
        os.close(w)

    asyncio.run(main())


def test_release_runs_once() -> None:
    calls: list[int] = []
    payload = PipePayload(0, 1, lambda: calls.append(1))
    payload.release()
    payload.release()
    assert calls == [1] and len(payload) == 1
