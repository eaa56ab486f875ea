"""`kata-runtime exec <sandbox-id>`: an interactive root shell in a sandbox's VM (not in a
container), over the VM's debug console port.

Theory of operation
-------------------
Only where the sandbox was started with ``[agent.kata] debug_console_enabled = true``: its
VM then has a second virtio-serial port, ``agent.debug_console.0``, whose host end is a unix
socket in the sandbox's socket dir (``debug-console.sock``, 0600, the VMM listening), and its
agent runs busybox ``sh`` on a pty behind that port, a fresh one for every session
(docs/security.md). When the agent is on vsock, the console is on its own vsock port
instead (1026, beside the agent's 1024; through the hybrid socket of our vhost-user back-end
where the host has no vhost-vsock), one connection per session. The sandbox's state.json
says whether it has the console, where the agent is, and which configuration it was started
with; a sandbox without it, or not running, is refused with the
fix (exit 1).

The session is telnet-like: with stdin on a terminal, the terminal goes raw (the guest's pty
does the echo and line editing) and is restored on the way out, whatever happens; typing
Ctrl-] ends the session. The agent ends it too once the shell exits: virtio-serial cannot
close the host's end, so it says so in-band (`DEBUG_CONSOLE_EXIT`, never shown). A stdin
that is not a terminal is sent as it is, then ``exit`` for the shell (not Ctrl-D: sent before
the shell's line editor has put its pty in raw mode, the pty's canonical mode would turn it
into a NUL the shell does not take for an end), so
``echo 'cat /proc/version' | kata-runtime exec <id>`` works as a one-shot.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from cli.listing import SandboxNotFound, add_sandbox_arguments, find_sandbox
from common.constants import DEBUG_CONSOLE_EXIT
from sandbox.config import RuntimeConfig
from sandbox.inspect import debug_console, dial_debug_console

PROG = "kata-runtime"
#: Seconds to reach the console (a running guest answers at once).
DIAL_TIMEOUT = 10.0
#: Ctrl-], as telnet.
ESCAPE = b"\x1d"
ESCAPE_NAME = "Ctrl-]"
#: What ends the guest shell after a non-terminal stdin (see the module docstring).
END_OF_INPUT = b"exit\n"
CHUNK = 65536
#: Bytes read from stdin but not yet taken by the socket, at most (then stdin waits).
MAX_PENDING = 1 << 20


class ExecRefused(Exception):
    """The sandbox cannot be reached this way; the message says why and what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``exec``'s own arguments."""
    add_sandbox_arguments(parser)


def run(config: RuntimeConfig, args: argparse.Namespace, err: TextIO | None = None) -> int:
    """The ``exec`` command: 0 after a session, 1 when refused or the connection fails."""
    err = err or sys.stderr
    try:
        sock = connect(config, args.sandbox_id, args.namespace)
    except ExecRefused as e:
        err.write(f"{PROG}: {e}\n")
        return 1
    raw = os.isatty(0)
    # Raw before the banner: what is typed once it shows must reach the guest.
    with sock, _restored_terminal(0 if raw else None):
        hint = f"type {ESCAPE_NAME} to leave" if raw else "stdin is sent, then exit"
        err.write(f"{PROG}: debug console of sandbox {args.sandbox_id}: a root shell in its "
                  f"VM; {hint}\r\n")  # fmt: skip
        err.flush()
        why = Bridge(sock, 0, 1, escape=raw).run()
    err.write(f"\r\n{PROG}: debug console closed ({why})\r\n")
    return 0


def connect(config: RuntimeConfig, sandbox_id: str, namespace: str | None) -> socket.socket:
    """A connection to the sandbox's debug console; `ExecRefused` saying why not."""
    entry = running_sandbox(config.state_dir, sandbox_id, namespace)
    ns = str(entry["namespace"])
    console = debug_console(config.state_dir, ns, sandbox_id)
    if not console.enabled:
        where = console.config_path or str(config.path)
        raise ExecRefused(
            f"debug console is disabled for sandbox {sandbox_id}: set debug_console_enabled "
            f"= true under [agent.kata] in {where} and restart the pod")
    try:
        return dial_debug_console(console, DIAL_TIMEOUT)
    except OSError as e:
        target = console.address or str(console.socket)
        raise ExecRefused(f"failed to connect to the debug console of sandbox {sandbox_id} at "
                          f"{target}: {e.strerror or e}") from e  # fmt: skip


def running_sandbox(state_dir: Path, sandbox_id: str, namespace: str | None) -> dict[str, Any]:
    """The one running sandbox of that id (in ``namespace`` if given); `ExecRefused` if none."""
    try:
        entry = find_sandbox(state_dir, sandbox_id, namespace)
    except SandboxNotFound as e:
        raise ExecRefused(str(e)) from e
    if not _running(entry):
        why = entry.get("problem") or "its shim or VM is not running"
        raise ExecRefused(f"sandbox {sandbox_id} is not running: {why}")
    return entry


def _running(entry: dict[str, Any]) -> bool:
    if "status" in entry:  # the listing's own verdict, when it gives one
        return bool(entry["status"] == "running")
    vmm = entry.get("vmm") or {}
    return (not entry.get("problem") and entry.get("shim", {}).get("state") == "alive"
            and vmm.get("state") == "alive")  # fmt: skip


@contextlib.contextmanager
def _restored_terminal(fd: int | None) -> Iterator[None]:
    """Raw mode on the terminal ``fd`` for the block (None: nothing to do); its settings
    come back on every way out, SIGTERM and SIGHUP included."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)

    def leave(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    handlers = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        tty.setraw(fd, termios.TCSANOW)  # not tty's default TCSAFLUSH: keep what was typed
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for s, handler in handlers.items():
            signal.signal(s, handler)


class ExitScanner:
    """Finds `DEBUG_CONSOLE_EXIT` in the guest's output, also when split across reads;
    returns what is safe to show."""

    def __init__(self, marker: bytes = DEBUG_CONSOLE_EXIT) -> None:
        self.marker = marker
        self._held = b""  # a tail that may be the start of the marker

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(bytes to show, whether the marker was seen: nothing after it matters)."""
        buf = self._held + data
        at = buf.find(self.marker)
        if at >= 0:
            self._held = b""
            return buf[:at], True
        keep = next((k for k in range(min(len(self.marker) - 1, len(buf)), 0, -1)
                     if buf.endswith(self.marker[:k])), 0)  # fmt: skip
        self._held = buf[len(buf) - keep:] if keep else b""
        return buf[:len(buf) - keep], False


class Bridge:
    """Copies stdin to the console socket and the socket to stdout until the shell exits,
    the connection ends, or (``escape``) the user types Ctrl-]."""

    def __init__(self, sock: socket.socket, stdin: int, stdout: int, escape: bool) -> None:
        self.sock = sock
        self.stdin = stdin
        self.stdout = stdout
        self.escape = escape
        self.scanner = ExitScanner()
        self._out = b""  # read from stdin, not yet sent
        self._stdin_open = True
        self._last_sent = b"\n"

    def run(self) -> str:
        """Bridge until the session ends; why it ended."""
        self.sock.setblocking(False)
        while True:
            readers = [self.sock] + ([self.stdin] if self._stdin_open
                                     and len(self._out) < MAX_PENDING else [])
            writers = [self.sock] if self._out else []
            readable, writable, _ = select.select(readers, writers, [])
            if self.sock in writable:
                self._send()
            if self.sock in readable:
                why = self._from_guest()
                if why:
                    return why
            if self.stdin in readable:
                why = self._from_user()
                if why:
                    return why

    def _send(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        self._last_sent = self._out[sent - 1:sent] or self._last_sent
        self._out = self._out[sent:]

    def _from_guest(self) -> str:
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return ""
        except OSError as e:
            return f"connection failed: {e.strerror or e}"
        if not data:
            return "the VM closed the connection"
        show, ended = self.scanner.feed(data)
        _write_all(self.stdout, show)
        return "the shell exited" if ended else ""

    def _from_user(self) -> str:
        data = os.read(self.stdin, CHUNK)
        if self.escape and ESCAPE in data:
            self._out += data[:data.index(ESCAPE)]
            self._flush()
            return f"{ESCAPE_NAME} typed"
        if not data:  # end of input: let the shell end after what it was sent
            self._stdin_open = False
            at_line_start = (self._out[-1:] or self._last_sent) == b"\n"
            self._out += END_OF_INPUT if at_line_start else b"\n" + END_OF_INPUT
        self._out += data
        return ""

    def _flush(self) -> None:
        """Send what is pending before leaving (bounded: the guest may not be reading)."""
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self.sock.sendall(self._out)
        self._out = b""


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:  # a non-blocking stdout someone handed us
            select.select([], [fd], [])
