"""A guest that floods or lies over the agent channel, against the real host side.

`HostileAgent` listens on a unix socket, like the VMM's end of the agent channel, and answers
the real `AgentClient` however a scenario says: oversized frames, malformed protobuf,
replies to requests never sent, slow replies, garbage, endless output. The host must not
crash, must keep its memory bounded, must give a clear error, and (with a `Sandbox`) must
tear the pod down once the agent has broken the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_client import AgentCallError, AgentClient
from protocols import agent_pb2 as pb
from protocols import ttrpc_pb2
from ttrpc import Code
from ttrpc.frames import HEADER, FrameDecoder, MessageType, encode_frame

Reply = Callable[[int, str, asyncio.StreamWriter], Awaitable[None]]


def response(stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    body = ttrpc_pb2.Response(payload=payload)
    if code:
        body.status.code, body.status.message = code, message
    return encode_frame(stream_id, MessageType.RESPONSE, body.SerializeToString())


async def answer_check(stream_id: int, writer: asyncio.StreamWriter) -> None:
    writer.write(response(stream_id, pb.HealthCheckResponse(status=1).SerializeToString()))


class HostileAgent:
    """A ttrpc peer on a unix socket; ``reply(stream_id, method, writer)`` per request.
    The first Check (the host's dial) is answered honestly."""

    def __init__(self, path: Path, reply: Reply) -> None:
        self.path = path
        self.reply = reply
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> HostileAgent:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, dialled = FrameDecoder(), False
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                decoder.feed(data)
                for frame in decoder.events():
                    request = ttrpc_pb2.Request.FromString(getattr(frame, "payload", b""))
                    if request.method == "Check" and not dialled:
                        dialled = True
                        await answer_check(frame.stream_id, writer)
                    else:
                        await self.reply(frame.stream_id, request.method, writer)
                    await writer.drain()
        writer.close()


def scenario(tmp_path: Path, reply: Reply, body: Callable[[AgentClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with HostileAgent(tmp_path / "agent.sock", reply):
            agent = await AgentClient.connect(f"serial://{tmp_path}/agent.sock", 5)
            try:
                await body(agent)
            finally:
                await agent.close()

    asyncio.run(main())


def test_an_oversized_reply_is_skipped_without_being_held(tmp_path: Path) -> None:
    size = 64 << 20  # 16 times the 4 MiB cap

    async def flood(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        if method != "ListProcesses":  # the next call is answered after the flood
            writer.write(response(stream_id, pb.HealthCheckResponse().SerializeToString()))
            return
        writer.write(HEADER.pack(size, stream_id, MessageType.RESPONSE, 0))
        chunk = b"\0" * (1 << 20)
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()

    async def body(agent: AgentClient) -> None:
        tracemalloc.start()
        try:
            with pytest.raises(AgentCallError) as info:
                await agent.list_processes("c1")
            await agent.health_check(30)  # answered once all 64 MiB went through
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        assert peak < 8 << 20, f"the host held {peak} bytes of a 64 MiB reply"

    scenario(tmp_path, flood, body)


def test_malformed_protobuf_is_a_clear_error_not_a_crash(tmp_path: Path) -> None:
    async def garbage_payload(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        if method == "ListProcesses":
            writer.write(response(stream_id, b"\xff\xff\xff\xff"))  # not a ListProcessesResponse
        else:
            writer.write(encode_frame(stream_id, MessageType.RESPONSE, b"\x0a\xff"))

    async def body(agent: AgentClient) -> None:
        for call in (agent.list_processes("c1"), agent.health_check(5)):
            with pytest.raises(AgentCallError) as info:
                await call
            assert info.value.code is Code.INTERNAL and "decod" in str(info.value)

    scenario(tmp_path, garbage_payload, body)


def test_replies_to_requests_never_sent_are_dropped(tmp_path: Path) -> None:
    async def confuse(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        for bogus in (stream_id + 2, 2, 9999, stream_id + 100):
            writer.write(response(bogus, b"\x08\x07"))
        writer.write(response(stream_id, pb.ListProcessesResponse(pids=[42]).SerializeToString()))

    async def body(agent: AgentClient) -> None:
        assert await agent.list_processes("c1") == [42]
        assert await agent.list_processes("c1") == [42]

    scenario(tmp_path, confuse, body)


def test_a_slow_agent_meets_the_deadline(tmp_path: Path) -> None:
    async def never(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        return  # no answer at all

    async def body(agent: AgentClient) -> None:
        with pytest.raises(AgentCallError) as info:
            await agent.health_check(0.2)
        assert info.value.code is Code.DEADLINE_EXCEEDED

    scenario(tmp_path, never, body)


def test_garbage_ends_the_connection_and_every_call(tmp_path: Path) -> None:
    async def garbage(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x00\x00\x01\x00\x00\x00\x01\x7f\x00X")  # unknown message type

    async def body(agent: AgentClient) -> None:
        with pytest.raises(AgentCallError) as info:
            await agent.list_processes("c1")
        assert info.value.code is Code.UNAVAILABLE and "protocol error" in str(info.value)
        await asyncio.wait_for(agent.wait_closed(), 1)
        with pytest.raises(AgentCallError):
            await agent.health_check(1)

    scenario(tmp_path, garbage, body)


def test_endless_output_flows_with_bounded_memory(tmp_path: Path) -> None:
    """ReadStdout that never ends: the host reads one chunk at a time, as fast as the sink
    takes it, and holds nothing more."""
    chunk = b"y" * (64 << 10)
    outstanding = [0, 0]  # current, most

    async def endless(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        if method == "ReadStdout":
            outstanding[0] += 1
            outstanding[1] = max(outstanding)
            await asyncio.sleep(0)
            outstanding[0] -= 1
            writer.write(response(stream_id, pb.ReadStreamResponse(data=chunk).SerializeToString()))

    async def body(agent: AgentClient) -> None:
        total = 0
        tracemalloc.start()
        try:
            while total < (32 << 20):  # 32 MiB through a slow consumer
                total += len(await agent.read_stdout("c1", ""))
                await asyncio.sleep(0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, peak
        assert outstanding[1] == 1  # never more than one read in flight

    scenario(tmp_path, endless, body)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.binary(min_size=1, max_size=2048))
def test_any_bytes_from_the_guest_give_an_error_or_an_answer(tmp_path: Path, noise: bytes) -> None:
    async def noisy(stream_id: int, method: str, writer: asyncio.StreamWriter) -> None:
        writer.write(noise)
        writer.write(response(stream_id, pb.HealthCheckResponse(status=1).SerializeToString()))

    async def body(agent: AgentClient) -> None:
        try:
            await agent.health_check(0.3)
        except AgentCallError as e:  # the only way to fail: a typed error, with a code
            assert e.code in set(Code)
        except TimeoutError:
            pytest.fail("a call has a deadline: no bare TimeoutError")

    path = tmp_path / f"h{abs(hash(noise)) % 10**8}"
    path.mkdir()
    scenario(path, noisy, body)
