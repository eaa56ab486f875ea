"""agent_client against a fake agent served by our real ttrpc server over a unix socket."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from agent_client import AgentCallError, AgentClient, ProcessExit
from agent_client.client import SERVICE, TIMEOUTS
from agent_client.errors import MAX_GUEST_MESSAGE
from protocols import agent_pb2 as pb
from ttrpc import Code, Server, TtrpcError
from ttrpc.server import current_request


class FakeAgent:
    def __init__(self) -> None:
        self.deadlines: dict[str, int] = {}
        self.requests: list[Message] = []

    def _seen(self) -> None:
        info = current_request()
        self.deadlines[info.method] = info.timeout_nano

    async def check(self, req: Any) -> Message:
        self._seen()
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def wait_process(self, req: Any) -> Message:
        self._seen()
        return pb.WaitProcessResponse(status=137)

    async def signal_process(self, req: Any) -> Message:
        self._seen()
        return Empty()

    async def restore_step(self, req: Any) -> Message:
        self._seen()
        self.requests.append(req)
        if isinstance(req, pb.ReseedRandomDevRequest) and not req.data:
            raise TtrpcError(Code.INVALID_ARGUMENT, "data is empty: nothing to reseed with")
        return Empty()

    async def create_container(self, req: Any) -> Message:
        raise TtrpcError(Code.INVALID_ARGUMENT, "crun: " + "x" * (MAX_GUEST_MESSAGE * 4))

    def methods(self) -> dict[str, tuple[type[Message], Any]]:
        return {
            "Check": (pb.CheckRequest, self.check),
            "WaitProcess": (pb.WaitProcessRequest, self.wait_process),
            "SignalProcess": (pb.SignalProcessRequest, self.signal_process),
            "CreateContainer": (pb.CreateContainerRequest, self.create_container),
            "SetGuestDateTime": (pb.SetGuestDateTimeRequest, self.restore_step),
            "ReseedRandomDev": (pb.ReseedRandomDevRequest, self.restore_step),
        }


async def with_agent(tmp_path: Path, body: Any) -> FakeAgent:
    fake = FakeAgent()
    server = Server()
    server.register(SERVICE, fake.methods())
    path = tmp_path / "agent.sock"
    listener = await asyncio.start_unix_server(server.serve_connection, str(path))
    try:
        agent = await AgentClient.connect(f"serial://{path}", timeout=5)
        try:
            await body(agent)
        finally:
            await agent.close()
    finally:
        listener.close()
    return fake


def test_deadlines_come_from_one_table(tmp_path: Path) -> None:
    async def body(agent: AgentClient) -> None:
        assert await agent.wait_process("c1", "") == ProcessExit(137)
        await agent.signal_process("c1", "", 9)

    fake = asyncio.run(with_agent(tmp_path, body))
    assert TIMEOUTS["WaitProcess"] is None and fake.deadlines["WaitProcess"] == 0  # long poll
    assert fake.deadlines["SignalProcess"] == int(TIMEOUTS["SignalProcess"] * 1e9)
    assert fake.deadlines["Check"] == int(5 * 1e9)  # connect: the boot deadline


def test_agent_errors_keep_their_code_and_are_bounded(tmp_path: Path) -> None:
    async def body(agent: AgentClient) -> None:
        with pytest.raises(AgentCallError) as info:
            await agent.create_container("c1", {}, False, False)
        assert info.value.code is Code.INVALID_ARGUMENT
        assert info.value.message.startswith("crun: ")
        assert len(str(info.value)) < MAX_GUEST_MESSAGE + 100
        with pytest.raises(AgentCallError) as info:
            await agent.list_processes("c1")  # the fake does not serve it
        assert info.value.code is Code.UNIMPLEMENTED

    asyncio.run(with_agent(tmp_path, body))


def test_connect_to_nothing_fails_fast(tmp_path: Path) -> None:
    async def run() -> None:
        with pytest.raises(OSError):
            await AgentClient.connect(f"serial://{tmp_path}/missing.sock", timeout=2)

    asyncio.run(run())


def test_clock_and_reseed_calls(tmp_path: Path) -> None:
    async def body(agent: AgentClient) -> None:
        await agent.set_guest_time(1_900_000_000, 123_456)
        await agent.reseed_random(b"\x01" * 64)
        with pytest.raises(AgentCallError) as info:
            await agent.reseed_random(b"")
        assert info.value.code is Code.INVALID_ARGUMENT
        assert str(info.value) == "ReseedRandomDev: data is empty: nothing to reseed with"

    fake = asyncio.run(with_agent(tmp_path, body))
    assert fake.requests[:2] == [pb.SetGuestDateTimeRequest(Sec=1_900_000_000, Usec=123_456),
                                 pb.ReseedRandomDevRequest(data=b"\x01" * 64)]
    for method in ("SetGuestDateTime", "ReseedRandomDev"):  # bounded by the table
        timeout = TIMEOUTS[method]
        assert timeout is not None and fake.deadlines[method] == int(timeout * 1e9)
