"""Task events to containerd: one FIFO queue, drained in order by one task.

Theory of operation
-------------------
:meth:`Publisher.publish` is synchronous: it stamps the event (envelope timestamp = now),
wraps it in an ``Envelope`` and appends it to the queue, so the order of ``publish`` calls is
the order containerd sees. Callers rely on that: the service publishes /tasks/start while
holding the container lock and the exit watcher publishes /tasks/exit under the same lock.

One drain task sends each envelope with ``containerd.services.events.ttrpc.v1.Events/
Forward`` to ``$TTRPC_ADDRESS`` (a plain socket path; containerd sets it when it starts the
shim). Each call has :data:`CALL_TIMEOUT`; a failed call drops the connection and retries at
once on a fresh one, then up to :data:`MAX_ATTEMPTS` times with a growing delay, in place
(a later event never overtakes an earlier one); after that the event is logged and dropped.
Without ``TTRPC_ADDRESS`` (e.g. under CRI-O) events are only logged, as Kata does.

:meth:`Publisher.close` waits (bounded) until the queue is empty, so the daemon delivers its
last exits before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from protocols import events_forward_pb2, events_pb2, mount_pb2
from sandbox.process import Process
from sandbox.types import ContainerConfig, StdioPaths
from shim.log import kv
from ttrpc import Client, TtrpcError

log = logging.getLogger("shim")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
CALL_TIMEOUT = 5.0
MAX_ATTEMPTS = 5
RETRY_DELAY = 1.0
NAMESPACE_METADATA = "containerd-namespace-ttrpc"
ZERO_TIME_SECONDS = -62135596800  # Go's time.Time{}: "not exited"

TOPICS: dict[type[Message], str] = {
    events_pb2.TaskCreate: "/tasks/create",
    events_pb2.TaskStart: "/tasks/start",
    events_pb2.TaskExit: "/tasks/exit",
    events_pb2.TaskDelete: "/tasks/delete",
    events_pb2.TaskExecAdded: "/tasks/exec-added",
    events_pb2.TaskExecStarted: "/tasks/exec-started",
    events_pb2.TaskOOM: "/tasks/oom",
    events_pb2.TaskPaused: "/tasks/paused",
    events_pb2.TaskResumed: "/tasks/resumed",
    events_pb2.TaskCheckpointed: "/tasks/checkpointed",
}

Connect = Callable[[str], Awaitable[Client]]


def envelope(namespace: str, event: Message, now_ns: int) -> events_forward_pb2.Envelope:
    """The Envelope containerd expects: timestamp, namespace, topic, Any without prefix."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(now_ns)
    body = any_pb2.Any(
        type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString()
    )
    return events_forward_pb2.Envelope(
        timestamp=stamp, namespace=namespace, topic=TOPICS[type(event)], event=body
    )


class Publisher:
    """Forwards task events to containerd in publish order."""

    def __init__(
        self,
        ttrpc_address: str,
        namespace: str,
        connect: Connect = Client.connect_unix,
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        self.address = ttrpc_address
        self.namespace = namespace
        self.dropped = 0
        self._connect = connect
        self._retry_delay = retry_delay
        self._queue: asyncio.Queue[events_forward_pb2.Envelope] = asyncio.Queue()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, event: Message) -> None:
        """Queue ``event`` (a containerd.events message) for delivery."""
        env = envelope(self.namespace, event, time.time_ns())
        log.debug("publish event", extra=kv(topic=env.topic, event=_brief(event)))
        if not self.address:
            log.info("event not forwarded: TTRPC_ADDRESS is not set",
                     extra=kv(topic=env.topic, event=_brief(event)))  # fmt: skip
            return
        self._queue.put_nowait(env)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while not self._queue.empty():
            env = self._queue.get_nowait()
            try:
                await self._deliver(env)
            finally:
                self._queue.task_done()

    async def _deliver(self, env: events_forward_pb2.Envelope) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                await self._forward_reconnecting(env)
                return
            except (TtrpcError, OSError) as e:
                if attempt == MAX_ATTEMPTS:
                    self.dropped += 1
                    log.error("failed to forward event: %s (dropped)", e,
                              extra=kv(topic=env.topic))  # fmt: skip
                    return
                log.warning("failed to forward event: %s (retrying)", e, extra=kv(topic=env.topic))
                await asyncio.sleep(self._retry_delay * attempt)

    async def _forward_reconnecting(self, env: events_forward_pb2.Envelope) -> None:
        """Forward once; if the connection was broken, once more on a new one."""
        fresh = self._client is None
        try:
            await self._forward(env)
        except (TtrpcError, OSError):
            await self._drop_client()
            if fresh:
                raise
            await self._forward(env)

    async def _forward(self, env: events_forward_pb2.Envelope) -> None:
        if self._client is None or self._client.closed.is_set():
            self._client = await self._connect(self.address)
        await self._client.call(
            EVENTS_SERVICE,
            "Forward",
            events_forward_pb2.ForwardRequest(envelope=env),
            empty_pb2.Empty,
            timeout=CALL_TIMEOUT,
            metadata={NAMESPACE_METADATA: self.namespace},
        )

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (for at most ``timeout`` s), then close the connection."""
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                log.error("dropped %d queued events at shutdown", self._queue.qsize() + 1)
        await self._drop_client()


def _brief(event: Message) -> str:
    """The event's text format on one line. From the message's own ``str`` (upb writes it
    natively; text_format is pure Python and would import protobuf's whole Python message
    implementation into every daemon: common/lazyimport.py). Strings inside are escaped, so
    only indentation and line ends are joined."""
    return " ".join(line.strip() for line in str(event).splitlines())


def exit_timestamp(ns: int | None) -> timestamp_pb2.Timestamp:
    """A Timestamp; ``None`` (not exited) is Go's zero time, as runc sends it."""
    stamp = timestamp_pb2.Timestamp()
    if ns is None:
        stamp.seconds, stamp.nanos = ZERO_TIME_SECONDS, 0
    else:
        stamp.FromNanoseconds(ns)
    return stamp


class TaskEvents:
    """The pod's events (`sandbox.pod.PodEvents`) as containerd.events messages, published
    in call order."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    def created(self, c: ContainerConfig, paths: StdioPaths, pid: int) -> None:
        """/tasks/create."""
        mounts = [
            mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
            for m in c.rootfs
        ]
        io = events_pb2.TaskIO(
            stdin=paths.stdin, stdout=paths.stdout, stderr=paths.stderr, terminal=paths.terminal
        )
        self._publisher.publish(
            events_pb2.TaskCreate(
                container_id=c.container_id, bundle=str(c.bundle), rootfs=mounts, io=io, pid=pid
            )
        )

    def started(self, container_id: str, pid: int) -> None:
        """/tasks/start."""
        self._publisher.publish(events_pb2.TaskStart(container_id=container_id, pid=pid))

    def exec_added(self, container_id: str, exec_id: str) -> None:
        """/tasks/exec-added."""
        self._publisher.publish(
            events_pb2.TaskExecAdded(container_id=container_id, exec_id=exec_id)
        )

    def exec_started(self, container_id: str, exec_id: str, pid: int) -> None:
        """/tasks/exec-started."""
        self._publisher.publish(
            events_pb2.TaskExecStarted(container_id=container_id, exec_id=exec_id, pid=pid)
        )

    def exited(self, p: Process, pid: int) -> None:
        """/tasks/exit (``id`` is the exec id, or the container id for init)."""
        self._publisher.publish(
            events_pb2.TaskExit(
                container_id=p.container_id,
                id=p.exec_id or p.container_id,
                pid=pid,
                exit_status=p.exit_status,
                exited_at=exit_timestamp(p.exited_at_ns),
            )
        )

    def oom(self, container_id: str) -> None:
        """/tasks/oom: the container's memory limit killed a process."""
        self._publisher.publish(events_pb2.TaskOOM(container_id=container_id))

    def paused(self, container_id: str) -> None:
        """/tasks/paused."""
        self._publisher.publish(events_pb2.TaskPaused(container_id=container_id))

    def resumed(self, container_id: str) -> None:
        """/tasks/resumed."""
        self._publisher.publish(events_pb2.TaskResumed(container_id=container_id))

    def deleted(self, p: Process, pid: int) -> None:
        """/tasks/delete."""
        self._publisher.publish(
            events_pb2.TaskDelete(
                container_id=p.container_id,
                id=p.exec_id or p.container_id,
                pid=pid,
                exit_status=p.exit_status,
                exited_at=exit_timestamp(p.exited_at_ns),
            )
        )
