"""The event publisher against a real ttrpc server standing in for containerd."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

from google.protobuf import empty_pb2

from protocols import events_forward_pb2, events_pb2
from shim.events import EVENTS_SERVICE, Publisher, envelope
from ttrpc import Code, Server, TtrpcError


class FakeContainerd:
    """Serves Events/Forward on a unix socket; can fail the first calls."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[events_forward_pb2.Envelope] = []
        self.metadata: list[str] = []
        self.fail_first = fail_first
        self.path = str(Path(tempfile.mkdtemp(dir="/tmp")) / "c.sock.ttrpc")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen()
        self.server = Server()
        self.server.register(EVENTS_SERVICE, {
            "Forward": (events_forward_pb2.ForwardRequest, self.forward),
        })  # fmt: skip
        self.task: asyncio.Task[None] | None = None

    async def forward(self, request: events_forward_pb2.ForwardRequest) -> empty_pb2.Empty:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise TtrpcError(Code.UNAVAILABLE, "not now")
        self.received.append(request.envelope)
        return empty_pb2.Empty()

    def __enter__(self) -> FakeContainerd:
        self.task = asyncio.ensure_future(self.server.serve_listener(self.sock))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()


def test_envelope_fields() -> None:
    event = events_pb2.TaskExit(container_id="c1", id="c1", pid=5, exit_status=3)
    env = envelope("k8s.io", event, 1_700_000_000_123_456_789)
    assert (env.namespace, env.topic) == ("k8s.io", "/tasks/exit")
    assert env.event.type_url == "containerd.events.TaskExit"  # no type.googleapis.com/
    assert events_pb2.TaskExit.FromString(env.event.value) == event
    assert (env.timestamp.seconds, env.timestamp.nanos) == (1_700_000_000, 123_456_789)


def test_events_arrive_in_publish_order_despite_failures() -> None:
    async def run() -> list[str]:
        with FakeContainerd(fail_first=2) as containerd:
            publisher = Publisher(containerd.path, "default", retry_delay=0.01)
            for i in range(20):
                publisher.publish(events_pb2.TaskStart(container_id=f"c{i}", pid=i))
            await publisher.close(timeout=5)
            assert publisher.dropped == 0
            return [events_pb2.TaskStart.FromString(e.event.value).container_id
                    for e in containerd.received]  # fmt: skip

    assert asyncio.run(run()) == [f"c{i}" for i in range(20)]


def test_unreachable_containerd_drops_after_retries() -> None:
    async def run() -> int:
        publisher = Publisher("/nonexistent/containerd.sock.ttrpc", "default", retry_delay=0.001)
        publisher.publish(events_pb2.TaskOOM(container_id="c1"))
        await publisher.close(timeout=5)
        return publisher.dropped

    assert asyncio.run(run()) == 1


def test_without_ttrpc_address_events_are_only_logged() -> None:
    async def run() -> None:
        publisher = Publisher("", "default")
        publisher.publish(events_pb2.TaskOOM(container_id="c1"))
        await publisher.close(timeout=1)
        assert publisher.dropped == 0

    asyncio.run(run())
