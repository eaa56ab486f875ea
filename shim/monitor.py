"""The shim's metrics endpoint: HTTP GET /metrics on a root-only unix socket.

Started by the sandbox once it runs (`sandbox.sandbox.Sandbox.monitor`) at
``<state_dir>/sk/<digest>/shim-monitor.sock``, and stopped (the socket removed) first when
it stops; a crash's clean-up removes the socket dir. ``kata-runtime metrics`` reads it.

Bounded, on the daemon's one loop: one request per connection (`shim.httpreq` parses the
head), :data:`REQUEST_TIMEOUT` seconds to send it and as long to read the answer, at most
:data:`MAX_CONNECTIONS` at a time (more are closed at once), and one snapshot at a time
(concurrent scrapes wait for the lock rather than piling calls onto the agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from sandbox.monitor import snapshot
from sandbox.pod import Pod
from shim import tls
from shim.httpreq import Request, RequestError, error_response, parse_head, response
from shim.log import kv

log = logging.getLogger("shim")

METRICS_PATH = "/metrics"
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 8
READ_CHUNK = 4096


class Monitor:
    """The endpoint of one pod (see the module docstring)."""

    def __init__(self, pod: Pod) -> None:
        self._pod = pod
        self._scrape = asyncio.Lock()
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, path: Path) -> Callable[[], Awaitable[None]]:
        """Listen on ``path`` (0600, in a 0700 dir); returns the stop."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket a killed daemon left
        server = await asyncio.start_unix_server(self._accept, path, limit=READ_CHUNK)
        os.chmod(path, 0o600)  # the 0700 dir keeps others out until then
        log.info("metrics endpoint serving", extra=kv(socket=str(path)))

        async def stop() -> None:
            server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

        return stop

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        try:
            answer = await self._answer(reader)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.debug("metrics client dropped: %s", e)
        except asyncio.CancelledError:
            pass  # stop(): end quietly (3.11's stream callback logs a cancelled handler)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            request = await asyncio.wait_for(_read_head(reader), REQUEST_TIMEOUT)
        except RequestError as e:
            return error_response(e)
        if request.method != "GET":
            return response(405, b"only GET is served\n", extra=(("Allow", "GET"),))
        if request.path != METRICS_PATH:
            return response(404, f"not found; metrics are at {METRICS_PATH}\n".encode())
        return await self._metrics()

    async def _metrics(self) -> bytes:
        # prometheus_client takes ~0.3 s to import: on the first scrape only, and in a
        # thread so that the loop keeps serving the Task API meanwhile. It needs `ssl`.
        tls.allow()
        await asyncio.to_thread(importlib.import_module, "shim.exposition")
        from shim import exposition  # loaded by now

        try:
            async with self._scrape:
                snap = await snapshot(self._pod)
            text = exposition.render(snap, len(asyncio.all_tasks()))
        except Exception:  # a bug must cost one scrape, not the endpoint
            log.exception("failed to collect metrics")
            return response(500, b"failed to collect metrics; see the shim's log\n")
        return response(200, text, exposition.CONTENT_TYPE_LATEST)


async def _read_head(reader: asyncio.StreamReader) -> Request:
    """Read until the head parses; RequestError on garbage or an early end."""
    buffer = b""
    while True:
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            raise RequestError(400, "connection ended before the request head")
        buffer += chunk
        request = parse_head(buffer)
        if request is not None:
            return request
