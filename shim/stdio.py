"""containerd IO endpoints of one process: FIFOs, ``file://``, ``binary://`` or nothing.

Theory of operation
-------------------
containerd names each stream with a string (``stdin``, ``stdout``, ``stderr`` of Create and
Exec). :func:`open_stdio` turns those strings into endpoints the pumps in ``process.py`` use:
:class:`Sink` for output (``write``/``close``) and :class:`FifoSource` for stdin.

- ``""``: no stream (CRI's sandbox container uses null IO).
- no scheme: a FIFO the client created. stdout/stderr are opened ``O_RDWR|O_NONBLOCK``: the
  open never blocks and a reader that goes away causes no EPIPE (we are a reader too). stdin
  is opened ``O_RDONLY`` in a thread because that open blocks until the client opens its
  write end (a non-blocking reader with no writer would see EOF at once); reads are
  non-blocking afterwards.
- ``file:///path``: stdout and stderr appended to that file.
- ``binary:///path?k=v``: one logger process per process, ``path k v``, env
  ``CONTAINER_ID``/``CONTAINER_NAMESPACE``, stdout pipe on fd 3, stderr pipe on fd 4 and a
  ready pipe on fd 5 that it closes once ready (we wait for that). Teardown: close the pipes
  and give it a moment to exit on EOF, then SIGTERM, then SIGKILL; reaped through a pidfd.
- terminal: the pty in the guest merges stderr into stdout, so stderr is never opened.

Writes never block the event loop: a full pipe parks the writer until the fd is writable.
A sink whose reader is gone for good (EPIPE) drops further data; the process is unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlparse

from sandbox.errors import InvalidArgumentError, UnavailableError
from shim.spawning import spawn_with_fds

log = logging.getLogger("shim")

READ_SIZE = 32 * 1024
LOGGER_READY_TIMEOUT = 10.0
LOGGER_EOF_GRACE = 0.5
OPEN_RELEASE_SECONDS = 1.0
LOGGER_STOP_GRACE = 2.0


async def wait_fd(fd: int, writable: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


class Sink:
    """An output endpoint on a file descriptor we own."""

    def __init__(self, fd: int, name: str) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.name = name
        self.broken = False

    async def write(self, data: bytes) -> None:
        """Write all of ``data``; after EPIPE, drop everything."""
        view = memoryview(data)
        while view and self.fd is not None and not self.broken:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await wait_fd(self.fd, writable=True)
            except OSError as e:
                self.broken = True
                log.warning("failed to write %s: %s (dropping output)", self.name, e)

    def close(self) -> None:
        """Close the fd (the reader sees EOF once every writer has closed)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def _open_in_thread(path: str, flags: int) -> asyncio.Future[int]:
    """``os.open`` in a dedicated thread (it may block for long: not the default executor)."""
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[int] = loop.create_future()

    def deliver(fd: int | None, error: OSError | None) -> None:
        if opened.done():
            if fd is not None:
                os.close(fd)
        elif error is not None:
            opened.set_exception(error)
        else:
            assert fd is not None
            opened.set_result(fd)

    def run() -> None:
        fd, error = None, None
        try:
            fd = os.open(path, flags)
        except OSError as e:
            error = e
        try:
            loop.call_soon_threadsafe(deliver, fd, error)
        except RuntimeError:  # the loop is gone
            if fd is not None:
                os.close(fd)

    threading.Thread(target=run, name=f"open {path}", daemon=True).start()
    return opened


class FifoSource:
    """The stdin FIFO: opened in a thread (blocking open), then read without blocking."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self._closed = False
        self._opener = _open_in_thread(path, os.O_RDONLY)

    async def _ready_fd(self) -> int | None:
        if self.fd is None and not self._closed:
            fd = await asyncio.shield(self._opener)
            if self._closed:
                return None
            os.set_blocking(fd, False)
            self.fd = fd
        return self.fd

    def try_read(self) -> bytes | None:
        """Bytes available now, ``b""`` at EOF, ``None`` when nothing is pending."""
        if self.fd is None:
            return b"" if self._closed or self._opener.done() else None
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    async def read(self) -> bytes:
        """The next bytes, or ``b""`` at EOF (writer closed) or after :meth:`close`."""
        while True:
            fd = await self._ready_fd()
            if fd is None:
                return b""
            data = self.try_read()
            if data is not None:
                return data
            await wait_fd(fd, writable=False)

    async def _release_opener(self) -> None:
        """Unblock the opening thread by briefly opening the write end ourselves.

        That open fails (ENXIO) until the thread is inside open(2), so retry for a while.
        """
        deadline = time.monotonic() + OPEN_RELEASE_SECONDS
        while not self._opener.done() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            await asyncio.wait({self._opener}, timeout=0.01)

    async def close(self) -> None:
        """Close stdin (idempotent); a still-blocked open is released by opening the write end."""
        if self._closed:
            return
        self._closed = True
        await self._release_opener()
        opener = self._opener
        if not opener.done():
            opener.cancel()  # its thread closes the fd if the open ever completes
        elif not opener.cancelled() and opener.exception() is None and self.fd is None:
            os.close(opener.result())  # opened but never adopted by read()
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@dataclass
class BinaryLogger:
    """A ``binary://`` logging process and our ends of its stdout/stderr pipes."""

    pid: int
    stdout: Sink
    stderr: Sink
    pidfd: int

    @classmethod
    async def start(cls, uri: str, container_id: str, namespace: str) -> BinaryLogger:
        """Spawn the logger and wait until it closes its ready pipe."""
        parsed = urlparse(uri)
        argv = [parsed.path]
        for key, value in parse_qsl(parsed.query, keep_blank_values=True):
            argv += [key, value]
        env = {**os.environ, "CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            pid = spawn_with_fds(argv, env, {3: out_r, 4: err_r, 5: ready_w}, setsid=False)
        except OSError as e:
            for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
                os.close(fd)
            raise InvalidArgumentError(f"failed to start logger {argv[0]}: {e}") from e
        for fd in (out_r, err_r, ready_w):
            os.close(fd)
        logger = cls(pid, Sink(out_w, "stdout"), Sink(err_w, "stderr"), os.pidfd_open(pid))
        try:
            await asyncio.wait_for(_read_to_eof(ready_r), LOGGER_READY_TIMEOUT)
        except BaseException as e:  # a timeout, or the Create call was cancelled
            await logger.stop()
            if isinstance(e, TimeoutError):
                raise UnavailableError(f"failed to start logger {argv[0]}: not ready") from e
            raise
        finally:
            os.close(ready_r)
        return logger

    async def stop(self) -> None:
        """Close the pipes; if it does not exit on EOF, SIGTERM, then SIGKILL; reap it."""
        self.stdout.close()
        self.stderr.close()
        if self.pidfd < 0:
            return
        for sig, grace in ((None, LOGGER_EOF_GRACE), (signal.SIGTERM, LOGGER_STOP_GRACE),
                           (signal.SIGKILL, None)):  # fmt: skip
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wait_fd(self.pidfd, writable=False), grace)
                break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.pidfd = -1


async def _read_to_eof(fd: int) -> None:
    os.set_blocking(fd, False)
    while True:
        try:
            if not os.read(fd, 64):
                return
        except BlockingIOError:
            await wait_fd(fd, writable=False)


@dataclass
class Stdio:
    """The opened endpoints of one process; ``None`` means that stream is not wanted."""

    stdin: FifoSource | None = None
    stdout: Sink | None = None
    stderr: Sink | None = None
    logger: BinaryLogger | None = None
    _closed: bool = field(default=False, repr=False)

    async def close_outputs(self) -> None:
        """Close stdout and stderr (readers see EOF) and stop a logger."""
        if self.logger is not None:
            await self.logger.stop()
        for sink in (self.stdout, self.stderr):
            if sink is not None:
                sink.close()

    async def close(self) -> None:
        """Close every endpoint (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.stdin is not None:
            await self.stdin.close()
        await self.close_outputs()


def _open_output(uri: str, name: str) -> Sink:
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        fd = os.open(parsed.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    elif parsed.scheme in ("", "fifo"):
        fd = os.open(parsed.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    else:
        raise InvalidArgumentError(f"failed to open {name} {uri}: unsupported scheme")
    return Sink(fd, name)


async def open_stdio(
    stdin: str, stdout: str, stderr: str, terminal: bool, container_id: str, namespace: str
) -> Stdio:
    """Open the endpoints of one process (see the module docstring)."""
    io = Stdio()
    if terminal:
        stderr = ""
    try:
        if stdout.startswith("binary://"):
            io.logger = await BinaryLogger.start(stdout, container_id, namespace)
            io.stdout, io.stderr = io.logger.stdout, io.logger.stderr
            if not stderr:
                io.stderr = None
        else:
            io.stdout = _open_output(stdout, "stdout") if stdout else None
            io.stderr = _open_output(stderr, "stderr") if stderr else None
        if stdin:
            io.stdin = FifoSource(urlparse(stdin).path)
    except OSError as e:
        await io.close()
        raise InvalidArgumentError(f"failed to open stdio of {container_id}: {e}") from e
    except BaseException:
        await io.close()
        raise
    return io
