"""The guest's debug console: a root shell on a pty, bridged to the virtio-serial port
``agent.debug_console.0`` (the host's ``kata-runtime exec``), or to vsock port 1026 when the
agent is on vsock (`serve_vsock`: a connection per session, no port to share).

Theory of operation
-------------------
Served only when the kernel command line has ``agent.debug_console`` (the host adds it for
``[agent.kata] debug_console_enabled = true``); otherwise this module is not even imported.
It runs beside the agent API on the agent's event loop, and its shells are children of the
agent's one reaper.

The port has one host end, so there is one session at a time:

1. open the port and wait until a host client is connected (the port stops polling HUP);
2. open a fresh pty and spawn busybox ``sh`` as the leader of a new session whose
   controlling terminal is the pty (job control and Ctrl-C work);
3. copy port -> pty master and pty master -> port until the shell exits or the host leaves
   (a port read returns EOF);
4. the shell exited: its last output is passed on (bounded wait), then `DEBUG_CONSOLE_EXIT`,
   since virtio-serial cannot close the host's end; a host that stays and types gets a new
   shell. The host left: the pty is hung up (SIGHUP to the shell's session) and the shell
   SIGKILLed if it is still there after a grace period;
5. wait for the next host on the same open port (closing it would drop what the next
   host sends before we reopen).

Everything from the host is only ever written to the pty: the shell is what the host asked
for, a root shell in the guest (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
from collections.abc import Callable
from typing import Any

from agent.channel import open_char_device, wait_serial_port
from agent.errors import FailedPrecondition
from agent.reaper import Reaper
from agent.streams import StreamReader, StreamWriter
from common.constants import DEBUG_CONSOLE_EXIT, DEBUG_CONSOLE_PORT_NAME

SHELL = ("/bin/sh",)
SHELL_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/", "TERM": "vt100", "PS1": "[kata debug console] \\w # ",
}
CHUNK = 4096
#: Seconds: for the shell's last output after it exited; for it to die after a hang-up.
DRAIN_WAIT = 1.0
HANGUP_WAIT = 2.0
#: Polling intervals while no host is connected (a port without a host polls HUP).
_POLL_MIN = 0.02
_POLL_MAX = 0.5


def log(message: str) -> None:
    import sys

    print(f"kata-agent: debug console: {message}", file=sys.stderr, flush=True)


async def serve(reaper: Reaper, port: str | None = None) -> None:
    """Serve the debug console on ``port`` (default: the port named
    ``agent.debug_console.0``), one session after another; forever."""
    try:
        path = port or await wait_serial_port(DEBUG_CONSOLE_PORT_NAME)
    except FileNotFoundError as exc:  # asked for on the command line, but no port: say so
        log(str(exc))
        return
    log(f"serving on {path}")
    fd = await _open(path)
    try:
        while True:
            try:
                await _until(fd, _host_connected)
                # The shell exited but the host may still be there: a new shell if it types.
                while await session(reaper, fd):
                    if await _until(fd, _host_left_or_typed) & select.POLLHUP:
                        break
            except Exception as exc:  # one broken session must not end the console
                log(f"session failed: {exc!r}")
                await asyncio.sleep(_POLL_MAX)
    finally:
        os.close(fd)


async def serve_vsock(reaper: Reaper, port: int) -> None:
    """Serve the debug console on AF_VSOCK ``port`` (the agent is on vsock): one shell per
    host connection, one connection at a time; closing the connection ends the session
    (after `DEBUG_CONSOLE_EXIT` when the shell exited first, as on virtio-serial)."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(1)
    sock.setblocking(False)
    log(f"serving on vsock port {port}")
    loop = asyncio.get_running_loop()
    try:
        while True:
            conn, _ = await loop.sock_accept(sock)
            try:
                await session(reaper, conn.fileno())
            except Exception as exc:  # one broken session must not end the console
                log(f"session failed: {exc!r}")
            finally:
                conn.close()
    finally:
        sock.close()


async def _open(path: str) -> int:
    """The port, opened once for good: closing it would discard what a host that has just
    connected already sent (the guest driver drops a port's unread data at close)."""
    while True:
        try:
            return open_char_device(path)
        except OSError:  # EBUSY: one opener at a time
            await asyncio.sleep(_POLL_MIN)


def _host_connected(events: int) -> bool:
    return not events & select.POLLHUP


def _host_left_or_typed(events: int) -> bool:
    return bool(events & (select.POLLHUP | select.POLLIN))


async def _until(fd: int, done: Callable[[int], bool]) -> int:
    """Poll ``fd`` (backing off) until ``done(events)``; the events then."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    delay = _POLL_MIN
    while True:
        events = 0
        for _, ev in poller.poll(0):
            events |= ev
        if done(events):
            return events
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX)


async def session(reaper: Reaper, port_fd: int, shell: tuple[str, ...] = SHELL,
                  env: dict[str, str] | None = None) -> bool:
    """One shell bridged to the port; True if the shell exited (the host may still be
    connected), False if the host left first. ``port_fd`` stays open."""
    master, slave = os.openpty()
    try:
        pid, exited = reaper.spawn_on_tty(shell, os.ttyname(slave), env or SHELL_ENV)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the shell has its own: EOF on the master once it is gone
    log(f"shell pid {pid} started")
    term_in, term_out = StreamWriter(os.dup(master)), StreamReader(master)
    port_in, port_out = StreamReader(os.dup(port_fd)), StreamWriter(os.dup(port_fd))
    to_shell = asyncio.ensure_future(_copy(port_in, term_in))
    to_host = asyncio.ensure_future(_copy(term_out, port_out))
    try:
        ends: set[asyncio.Future[Any]] = {exited, to_shell}
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            return False
        await asyncio.wait({to_host}, timeout=DRAIN_WAIT)
        to_host.cancel()
        with contextlib.suppress(OSError, FailedPrecondition):
            await asyncio.wait_for(port_out.write(DEBUG_CONSOLE_EXIT), DRAIN_WAIT)
        return True
    finally:
        for task in (to_shell, to_host):
            task.cancel()
        # Let them leave their fd waits before the fds close (and their numbers get reused).
        await asyncio.gather(to_shell, to_host, return_exceptions=True)
        for end in (term_in, term_out, port_in, port_out):
            end.close_now()  # closing the master hangs the pty up: SIGHUP to the session
        status = await _reap(pid, exited)
        log(f"shell pid {pid} ended with status {status}")


async def _copy(src: StreamReader, dst: StreamWriter) -> None:
    """Until ``src`` ends (EOF, EIO) or ``dst`` cannot take more."""
    with contextlib.suppress(OSError, FailedPrecondition):
        while data := await src.read(CHUNK):
            await dst.write(data)


async def _reap(pid: int, exited: asyncio.Future[int]) -> int:
    """The shell's status; SIGKILL for its session if the hang-up did not end it."""
    with contextlib.suppress(TimeoutError):
        return await asyncio.wait_for(asyncio.shield(exited), HANGUP_WAIT)
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
    return await exited
