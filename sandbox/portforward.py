"""`kubectl port-forward` for a pod whose stack is in a VM.

containerd's CRI plugin serves a port-forward by dialling ``localhost:<port>`` inside the
pod's network namespace on the host; with the pod's stack in the guest nothing listens
there. `PortMirror` closes that gap: every `POLL_SECONDS` (`IDLE_POLL_SECONDS` after the
pod's first minute) it asks the agent which TCP ports listen in the guest, listens on the
netns's 127.0.0.1 and ::1 for each (sockets made on a thread inside the netns, served on
the shim's loop), and carries every connection it accepts to the guest's loopback over the
agent channel (PortForwardOpen, then reads and writes until both ends closed). The guest
names the ports, so their number is bounded by the client, and the listeners live only in
the pod's own netns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from agent_client import AgentApi, AgentCallError
from network.errors import NetworkError
from network.netns import listen_tcp
from sandbox.threads import in_thread

log = logging.getLogger(__name__)

#: How often the guest is asked for its listening ports: often while the pod starts (its
#: servers come up), then seldom (each ask is a round trip that costs guest CPU under TCG:
#: measured ~14 millicores of host CPU at a 2 s period).
POLL_SECONDS = 2.0
STARTUP_SECONDS = 60.0
IDLE_POLL_SECONDS = 10.0
CHUNK = 64 * 1024
LOOPBACKS = ("127.0.0.1", "::1")


class PortMirror:
    """The guest's listening ports, mirrored on the pod netns's loopback."""

    def __init__(self, netns_path: str, agent: AgentApi) -> None:
        self.netns_path = netns_path
        self._agent = agent
        self._servers: dict[int, list[asyncio.Server]] = {}
        self._connections: set[asyncio.Task[object]] = set()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def ports(self) -> list[int]:
        """The ports mirrored now."""
        return sorted(self._servers)

    def start(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        """Stop watching, close the listeners and every forwarded connection."""
        tasks: list[asyncio.Task[object] | asyncio.Task[None]] = [*self._connections]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for port in list(self._servers):
            await self._unmirror(port)

    async def _watch(self) -> None:
        started = asyncio.get_running_loop().time()
        while True:
            # Sleep first: the pod's start (its first containers) goes before the watch.
            young = asyncio.get_running_loop().time() - started < STARTUP_SECONDS
            await asyncio.sleep(POLL_SECONDS if young else IDLE_POLL_SECONDS)
            try:
                ports = set(await self._agent.listening_ports())
            except AgentCallError as e:
                log.debug("listening ports of the guest unknown: %s", e)
                ports = set(self._servers)
            for port in sorted(ports - self._servers.keys()):
                await self._mirror(port)
            for port in sorted(self._servers.keys() - ports):
                await self._unmirror(port)

    async def _mirror(self, port: int) -> None:
        servers = []
        for host in LOOPBACKS:
            try:
                sock = await in_thread(listen_tcp, self.netns_path, host, port)
            except (OSError, NetworkError) as e:  # taken in the netns, or no IPv6 there
                log.debug("not mirroring port %d on %s: %s", port, host, e)
                continue
            serve = functools.partial(self._serve, port)
            servers.append(await asyncio.start_server(serve, sock=sock))
        self._servers[port] = servers
        if servers:
            log.info("guest port %d mirrored on the pod netns's loopback", port)

    async def _unmirror(self, port: int) -> None:
        for server in self._servers.pop(port, []):
            server.close()
            await server.wait_closed()

    async def _serve(self, port: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            conn_id = await self._agent.port_forward_open(port)
        except AgentCallError as e:
            log.info("port-forward to guest port %d refused: %s", port, e)
            self._connections.discard(task)
            writer.close()
            return
        try:
            await asyncio.gather(self._to_guest(reader, conn_id),
                                 self._from_guest(writer, conn_id))
        except (AgentCallError, ConnectionError) as e:
            log.debug("port-forward connection %d to port %d ended: %s", conn_id, port, e)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(AgentCallError, asyncio.CancelledError):
                await self._agent.port_forward_close(conn_id)

    async def _to_guest(self, reader: asyncio.StreamReader, conn_id: int) -> None:
        while data := await reader.read(CHUNK):
            await self._agent.port_forward_write(conn_id, data)
        await self._agent.port_forward_close_write(conn_id)

    async def _from_guest(self, writer: asyncio.StreamWriter, conn_id: int) -> None:
        while data := await self._agent.port_forward_read(conn_id, CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
