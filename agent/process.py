"""One container process (init or exec): its stdio, pid, state and exit status.

Theory of operation
-------------------
State machine: ``CREATED`` (crun created it; pid known; not yet running user code for an
init process) -> ``RUNNING`` (started) -> ``EXITED`` (the reaper delivered its status).
An exit can arrive in any state (a created container can be killed), so ``EXITED`` is set
by the exit future's callback, never by the caller.

Stdio is prepared *before* crun runs (:class:`StdioSetup`): for a plain process three
pipes (stdin: a pipe, or /dev/null when the host sends no stdin), whose child ends crun
passes on to the process and which we close once crun has been spawned; for a terminal a
unix socket on which crun hands us the pty master (SCM_RIGHTS), while crun itself gets
/dev/null. Our ends become :mod:`agent.streams` objects. A terminal has no separate
stderr: its stderr reader is at EOF from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import os
import socket

from agent.errors import FailedPrecondition, NotFound
from agent.streams import StreamReader, StreamWriter


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


class Process:
    def __init__(self, container_id: str, exec_id: str, terminal: bool) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.terminal = terminal
        self.pid = 0
        self.state = State.CREATED
        self.stdin = StreamWriter(None)
        self.stdout = StreamReader(None)
        self.stderr = StreamReader(None)
        self._exit: asyncio.Future[int] | None = None

    def attach(self, pid: int, exited: asyncio.Future[int]) -> None:
        """Bind the process to its pid and the reaper's exit future for it."""
        self.pid = pid
        self._exit = exited
        exited.add_done_callback(self._on_exit)

    def _on_exit(self, _fut: asyncio.Future[int]) -> None:
        self.state = State.EXITED

    @property
    def exited(self) -> bool:
        return self.state is State.EXITED

    @property
    def exit_status(self) -> int | None:
        if self._exit is None or not self._exit.done():
            return None
        return self._exit.result()

    async def wait(self) -> int:
        if self._exit is None:
            raise FailedPrecondition(f"process {self.exec_id or 'init'} was never started")
        # shield: a cancelled WaitProcess call must not cancel the shared exit future.
        return await asyncio.shield(self._exit)

    def signal(self, sig: int) -> None:
        if self.pid == 0 or self.exited:
            raise NotFound(f"process {self.exec_id or 'init'} already finished")
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError as exc:
            raise NotFound(f"process {self.exec_id or 'init'} already finished") from exc

    def signal_quietly(self, sig: int) -> None:
        """Signal if still alive; used on teardown where "already gone" is success."""
        if self.pid and not self.exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def resize(self, rows: int, columns: int) -> None:
        """TIOCSWINSZ on the pty master (either of our dups of it)."""
        import fcntl
        import struct
        import termios

        fd = self.stdout.fd if self.stdout.fd is not None else self.stdin.fd
        if not self.terminal or fd is None:
            raise FailedPrecondition("the process has no open terminal")
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    async def close_streams(self) -> None:
        self.stdin.close_now()
        self.stdout.close_now()
        self.stderr.close_now()


#: What a process's stdout and stderr pipes hold (64 KiB by default): the host asks for up
#: to 1 MiB per ReadStdout (agent_client READ_CHUNK, validate.MAX_READ), and each answer
#: costs the guest 1-3 ms of Python under TCG, so fewer, fuller answers move output faster
#: (docs/performance.md "Levers"). Pages are allocated only while output waits in the pipe.
OUTPUT_PIPE_BYTES = 1 << 20


def widen_pipe(fd: int) -> None:
    """Grow the pipe to OUTPUT_PIPE_BYTES; where the kernel refuses, it keeps its size."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, OUTPUT_PIPE_BYTES)


class StdioSetup:
    """The fds a crun create/exec call hands to a new process, and our ends of them."""

    def __init__(self, terminal: bool, stdin: bool, console_path: str) -> None:
        self.terminal = terminal
        self.console_path = console_path
        self._child: list[int] = []
        self._ours: list[int] = []
        self.console: socket.socket | None = None
        self._pipes = (-1, -1, -1)
        devnull = self._keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        if terminal:
            self.child_stdio = (devnull, devnull, devnull)
            self.console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.console.bind(console_path)
            self.console.listen(1)
            self.console.setblocking(False)
            return
        in_r, in_w = os.pipe() if stdin else (devnull, -1)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            widen_pipe(fd)
        self._child += [fd for fd in (in_r, out_w, err_w) if fd != devnull]
        self._ours += [fd for fd in (in_w, out_r, err_r) if fd >= 0]
        self.child_stdio = (in_r, out_w, err_w)
        self._pipes = (in_w, out_r, err_r)

    def _keep(self, fd: int) -> int:
        self._child.append(fd)
        return fd

    async def receive_master(self) -> int:
        """Accept crun's connection on the console socket and take the pty master fd."""
        assert self.console is not None
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self.console)
        with conn:
            conn.setblocking(False)
            while True:
                try:
                    _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
                    break
                except BlockingIOError:
                    await _readable(loop, conn)
        if not fds:
            raise FailedPrecondition("crun sent no pty master on the console socket")
        self._ours.append(fds[0])
        return fds[0]

    def close_child_ends(self) -> None:
        """After crun has them: our copies would keep EOF from ever reaching us."""
        for fd in self._child:
            os.close(fd)
        self._child.clear()
        if self.console is not None:
            self.console.close()
            _unlink(self.console_path)

    def hand_over(self, process: Process, master: int | None, gather: bool = False) -> None:
        """Give our ends to ``process``; after this, they are the process's to close.
        ``gather``: its output pipes' readers gather output in full flow (agent.streams;
        a pty's reads stay as they come)."""
        if master is not None:
            process.stdout = StreamReader(master)
            process.stdin = StreamWriter(os.dup(master), eof_byte=b"\x04")
        else:
            in_w, out_r, err_r = self._pipes
            process.stdin = StreamWriter(in_w if in_w >= 0 else None)
            process.stdout = StreamReader(out_r, gather)
            process.stderr = StreamReader(err_r, gather)
        self._ours.clear()

    def abort(self) -> None:
        """Close everything (crun failed)."""
        self.close_child_ends()
        for fd in self._ours:
            os.close(fd)
        self._ours.clear()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
