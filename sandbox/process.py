"""Init and exec processes: one lifecycle table, stdio pumps and the exit watcher.

Theory of operation
-------------------
Rule 1: every state change goes through `sandbox.lifecycle.transition`, which looks the
``(state, op)`` cell up in :data:`TRANSITIONS`. Each cell is listed explicitly: either the
next state or a :class:`Refusal` naming the error containerd gets (FAILED_PRECONDITION, or
NOT_FOUND for a process that is gone, which containerd and CRI tolerate on Kill). The state
changes only after the side effect of the operation succeeded.

Rule 2: the caller holds the container's lock for ``start``, ``kill``, ``delete``, ``resize``
and ``close_stdin``; the exit watcher takes the same lock to record the exit. So the start
event (published by the pod while it still holds the lock) always precedes the exit.

Lifecycle (``created -> running -> stopped -> deleted``, ``created -> stopped`` by kill)::

    created --start--> running --exit--> stopped --delete--> deleted
       |                                    ^
       +----------------kill----------------+   (never started: exit 128+signal, e.g. 137)

A process reaches the guest only through a `ProcessGuest` (`sandbox.guest.Guest`).
Pumps run only once the process is started in the guest: stdin endpoint -> ``write_stdin``
(then ``close_stdin`` on EOF or after ``CloseIO``), ``read_stdout``/``read_stderr`` -> the
endpoints until ``b""``. The exit watcher awaits ``wait_process``; a failure there means the
VM or agent is gone and becomes exit status 255, so no Wait hangs. After the exit it gives
the output pumps :data:`DRAIN_SECONDS` to finish, closes the outputs (the client's readers
see EOF, which ``ctr`` waits for before Delete), runs the ``before_exit`` hook (init waits
for its execs: the init exit is published last), then records the exit, wakes every Wait and
calls ``on_exit`` (which publishes /tasks/exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from agent_client import ProcessExit
from common.constants import EXIT_STATUS_KILLED
from sandbox.errors import (
    FailedPreconditionError,
    NotFoundError,
    SandboxError,
    UnavailableError,
)
from sandbox.lifecycle import Refusal, transition
from sandbox.logfields import kv
from sandbox.processio import InputSource, ProcessIO
from sandbox.types import ExecConfig, StdioPaths

log = logging.getLogger("sandbox")

DRAIN_SECONDS = 2.0
EXIT_STATUS_LOST = 255  # the VM or agent went away: the real status is unknowable
SIGNAL_EXIT_BASE = 128


class State(enum.Enum):
    """Lifecycle of a process (mapped onto containerd's Status by the service)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"  # the container's cgroup is frozen (init processes only)
    STOPPED = "stopped"
    DELETED = "deleted"


LIVE = (State.RUNNING, State.PAUSED)  # started and not exited: signals and exits reach it


class Op(enum.Enum):
    """Operations a process can be asked for."""

    START = "start"
    KILL = "kill"
    EXIT = "exit"
    DELETE = "delete"
    RESIZE_PTY = "resize the pty of"
    CLOSE_STDIN = "close stdin of"
    PAUSE = "pause"
    RESUME = "resume"


class InvalidTransition(FailedPreconditionError):
    """The operation is not allowed in the process's state."""


class ProcessGone(NotFoundError):
    """The process has exited or was deleted."""


_GONE = Refusal(ProcessGone, "it was deleted")
_NOT_RUNNING = Refusal(InvalidTransition, "it is not running")
_EXITED = Refusal(InvalidTransition, "it has already exited")
TRANSITIONS: dict[tuple[State, Op], State | Refusal] = {
    (State.CREATED, Op.START): State.RUNNING,
    (State.CREATED, Op.KILL): State.STOPPED,
    (State.CREATED, Op.EXIT): Refusal(InvalidTransition, "it was never started"),
    (State.CREATED, Op.DELETE): State.DELETED,
    (State.CREATED, Op.RESIZE_PTY): State.CREATED,
    (State.CREATED, Op.CLOSE_STDIN): State.CREATED,
    (State.CREATED, Op.PAUSE): _NOT_RUNNING,
    (State.CREATED, Op.RESUME): Refusal(InvalidTransition, "it is not paused"),
    (State.RUNNING, Op.START): Refusal(InvalidTransition, "it is already running"),
    (State.RUNNING, Op.KILL): State.RUNNING,  # the exit comes later, from wait_process
    (State.RUNNING, Op.EXIT): State.STOPPED,
    (State.RUNNING, Op.DELETE): Refusal(InvalidTransition, "it is still running: kill it first"),
    (State.RUNNING, Op.RESIZE_PTY): State.RUNNING,
    (State.RUNNING, Op.CLOSE_STDIN): State.RUNNING,
    (State.RUNNING, Op.PAUSE): State.PAUSED,
    (State.RUNNING, Op.RESUME): Refusal(InvalidTransition, "it is not paused"),
    (State.PAUSED, Op.START): Refusal(InvalidTransition, "it is already running (paused)"),
    (State.PAUSED, Op.KILL): State.PAUSED,  # a frozen cgroup still takes SIGKILL
    (State.PAUSED, Op.EXIT): State.STOPPED,
    (State.PAUSED, Op.DELETE): Refusal(InvalidTransition, "it is paused: kill it first"),
    (State.PAUSED, Op.RESIZE_PTY): State.PAUSED,
    (State.PAUSED, Op.CLOSE_STDIN): State.PAUSED,
    (State.PAUSED, Op.PAUSE): Refusal(InvalidTransition, "it is already paused"),
    (State.PAUSED, Op.RESUME): State.RUNNING,
    (State.STOPPED, Op.START): Refusal(InvalidTransition, "it has already exited"),
    (State.STOPPED, Op.KILL): Refusal(ProcessGone, "it has already exited"),
    (State.STOPPED, Op.EXIT): Refusal(InvalidTransition, "it has already exited"),
    (State.STOPPED, Op.DELETE): State.DELETED,
    (State.STOPPED, Op.RESIZE_PTY): Refusal(InvalidTransition, "it has already exited"),
    (State.STOPPED, Op.CLOSE_STDIN): State.STOPPED,  # nothing left to close: harmless
    (State.STOPPED, Op.PAUSE): _EXITED,
    (State.STOPPED, Op.RESUME): _EXITED,
    (State.DELETED, Op.START): _GONE,
    (State.DELETED, Op.KILL): _GONE,
    (State.DELETED, Op.EXIT): _GONE,
    (State.DELETED, Op.DELETE): _GONE,
    (State.DELETED, Op.RESIZE_PTY): _GONE,
    (State.DELETED, Op.CLOSE_STDIN): _GONE,
    (State.DELETED, Op.PAUSE): _GONE,
    (State.DELETED, Op.RESUME): _GONE,
}


class ProcessGuest(Protocol):
    """What a process needs of the guest (`sandbox.guest.Guest`)."""

    # lifecycle
    async def start_container(self, container_id: str) -> int: ...
    async def exec_process(
        self, container_id: str, exec_id: str, process: dict[str, Any], stdin: bool
    ) -> int: ...
    async def wait_process(self, container_id: str, exec_id: str) -> ProcessExit: ...
    async def pause_container(self, container_id: str) -> None: ...
    async def resume_container(self, container_id: str) -> None: ...
    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all: bool = False
    ) -> None: ...

    # stdio
    async def read_stdout(self, container_id: str, exec_id: str) -> bytes: ...
    async def read_stderr(self, container_id: str, exec_id: str) -> bytes: ...
    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int: ...
    async def close_stdin(self, container_id: str, exec_id: str) -> None: ...
    async def resize_pty(
        self, container_id: str, exec_id: str, width: int, height: int
    ) -> None: ...


class Process:
    """An init (exec id "") or exec process of one container."""

    def __init__(
        self,
        guest: ProcessGuest,
        container_id: str,
        exec_id: str,
        paths: StdioPaths,
        lock: asyncio.Lock,
        on_exit: Callable[[Process], None],
        io: ProcessIO | None = None,
        exec_config: ExecConfig | None = None,
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.exec_config = exec_config  # None for the init process
        self.paths = paths
        self.state = State.CREATED
        self.guest_pid = 0
        self.exit_status = 0
        self.exited_at_ns: int | None = None
        self.oom_killed = False  # init: its cgroup's memory limit killed a process
        self.io: ProcessIO = io or NoIO()
        self.before_exit: Callable[[], Awaitable[None]] | None = None  # init: wait for execs
        self._guest = guest
        self._lock = lock  # the container's lock (rule 2)
        self._on_exit = on_exit
        self._exited = asyncio.Event()
        self._close_stdin = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pending_size: tuple[int, int] | None = None  # a resize before Start

    @property
    def name(self) -> str:
        """``container`` or ``container/exec`` for messages."""
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    def ensure(self, op: Op) -> State:
        """The state ``op`` would lead to; raises if ``op`` is forbidden now."""
        return transition(TRANSITIONS, self.state, op, f"process {self.name}")

    # operations (caller holds the container lock)
    async def start(self) -> int:
        """Start the process in the guest, then its pumps and exit watcher; the guest pid."""
        after = self.ensure(Op.START)
        try:
            pid = await self._start_in_guest()
        except BaseException:
            # containerd's Go client reports a failed start only once its copy loops end,
            # and they end when our ends of its fifos close: `ctr task exec` of a missing
            # program hung here. The process stays created, so Delete works.
            await self.io.close()
            raise
        self.guest_pid, self.state = pid, after
        if self._pending_size is not None:
            with contextlib.suppress(SandboxError):  # the process may be gone already
                await self._guest.resize_pty(self.container_id, self.exec_id,
                                             *self._pending_size)  # fmt: skip
        self._spawn("stdout", self._pump_output(self._guest.read_stdout, "stdout"))
        if not self.paths.terminal:
            self._spawn("stderr", self._pump_output(self._guest.read_stderr, "stderr"))
        if self.io.stdin is not None:
            self._spawn("stdin", self._pump_stdin(self.io.stdin))
        self._spawn("exit", self._watch_exit())
        return pid

    async def _start_in_guest(self) -> int:
        if self.exec_config is None:
            return await self._guest.start_container(self.container_id)
        e = self.exec_config
        return await self._guest.exec_process(self.container_id, self.exec_id, e.process,
                                              e.stdin)  # fmt: skip

    async def kill(self, signal: int, all: bool = False) -> None:
        """Signal the process; a never-started one is marked stopped with 128+signal.

        ``all`` reaches every process of the container only from the init process: on an
        exec it signals that exec alone, as runc's shim does."""
        after = self.ensure(Op.KILL)
        if self.state in LIVE:
            await self._guest.signal_process(self.container_id, self.exec_id, signal,
                                             all and not self.exec_id)  # fmt: skip
        elif signal != 0:
            await self._stop_tasks_and_io()
            self._record_exit(after, SIGNAL_EXIT_BASE + signal)

    async def pause(self) -> None:
        """Freeze the container (init processes: the whole container's cgroup)."""
        after = self.ensure(Op.PAUSE)
        await self._guest.pause_container(self.container_id)
        self.state = after

    async def resume(self) -> None:
        """Thaw a paused container."""
        after = self.ensure(Op.RESUME)
        await self._guest.resume_container(self.container_id)
        self.state = after

    async def resize(self, width: int, height: int) -> None:
        """Set the pty size (a no-op without a terminal, as in runc); before Start the size
        is kept and applied as soon as the process runs."""
        self.ensure(Op.RESIZE_PTY)
        if not self.paths.terminal:
            return
        if self.state in LIVE:
            await self._guest.resize_pty(self.container_id, self.exec_id, width, height)
        else:
            self._pending_size = (width, height)

    def close_stdin(self) -> None:
        """Close stdin once what is already written has been forwarded."""
        self.ensure(Op.CLOSE_STDIN)
        self._close_stdin.set()

    async def delete(self, force: bool = False) -> None:
        """Release the endpoints and forget the process (refused while it runs).

        ``force`` (the init's container is going away) skips the check. A process deleted
        without an exit (never started) wakes its waiters: an init with 128+SIGKILL, an exec
        with 0 (containerd's runc shim does the same).
        """
        after = State.DELETED if force else self.ensure(Op.DELETE)
        await self._stop_tasks_and_io()
        if not self._exited.is_set():
            status = 0 if self.exec_id and self.state is State.CREATED else EXIT_STATUS_KILLED
            self.exit_status, self.exited_at_ns = status, time.time_ns()
            self._exited.set()
        self.state = after

    async def wait(self) -> None:
        """Return once the process has exited (works before start)."""
        await self._exited.wait()

    # internals
    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(functools.partial(self._task_done, name))
        self._tasks[name] = task

    def _task_done(self, name: str, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            log.debug("%s task of %s cancelled", name, self.name)
        elif task.exception() is not None:
            log.error("%s task of %s failed: %r", name, self.name, task.exception())

    async def _stop_tasks_and_io(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks.values() if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self.io.close()

    def _record_exit(self, after: State, status: int) -> None:
        self.state, self.exit_status, self.exited_at_ns = after, status, time.time_ns()
        self._exited.set()
        log.info("process exited", extra=kv(container=self.container_id,
                                            exec=self.exec_id, exit_status=status))  # fmt: skip
        self._on_exit(self)

    async def _watch_exit(self) -> None:
        try:
            exit = await self._guest.wait_process(self.container_id, self.exec_id)
        except Exception as e:
            log.warning("failed to wait for process %s: %s", self.name, e)
            exit = ProcessExit(EXIT_STATUS_LOST)
        status = exit.status
        try:
            await self._drain_outputs()
            if self.before_exit is not None:
                await self.before_exit()
        except Exception as e:  # the exit must be recorded whatever happens to the IO
            log.error("failed to finish the IO of %s: %s", self.name, e)
        async with self._lock:
            if self.state in LIVE:
                self.oom_killed = exit.oom_killed
                self._record_exit(self.ensure(Op.EXIT), status)

    async def _drain_outputs(self) -> None:
        pumps = [self._tasks[n] for n in ("stdout", "stderr") if n in self._tasks]
        if pumps:
            _done, pending = await asyncio.wait(pumps, timeout=DRAIN_SECONDS)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("output of %s not drained %ss after exit", self.name, DRAIN_SECONDS)
                await asyncio.wait(pending)
        stdin = self._tasks.get("stdin")
        if stdin is not None and not stdin.done():
            stdin.cancel()
            await asyncio.wait([stdin])
        await self.io.close()

    async def _pump_output(self, read: Callable[[str, str], Awaitable[bytes]], name: str) -> None:
        sink = self.io.stdout if name == "stdout" else self.io.stderr
        try:
            while data := await read(self.container_id, self.exec_id):
                if sink is not None:
                    await sink.write(data)
        except Exception as e:
            log.debug("stopped copying %s of %s: %s", name, self.name, e)
        finally:
            if sink is not None:
                sink.close()  # the client's reader sees EOF

    async def _pump_stdin(self, source: InputSource) -> None:
        closer = asyncio.ensure_future(self._close_stdin.wait())
        try:
            try:
                await self._copy_stdin(source, closer)
            except Exception as e:
                log.warning("stopped copying stdin of %s: %s", self.name, e)
            try:
                # Also after a failure: the process must see EOF rather than wait forever.
                await self._guest.close_stdin(self.container_id, self.exec_id)
            except Exception as e:
                log.debug("failed to close stdin of %s: %s", self.name, e)
        finally:
            closer.cancel()
            await source.close()

    async def _copy_stdin(
        self, source: InputSource, closer: asyncio.Task[Literal[True]]
    ) -> None:
        """Forward stdin until EOF, or until CloseIO (then what is already there)."""
        while True:
            reader = asyncio.ensure_future(source.read())
            await asyncio.wait([reader, closer], return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                reader.cancel()
                await asyncio.wait([reader])
                while data := source.try_read():
                    await self._write_stdin(data)
                return
            data = reader.result()
            if not data:
                return
            await self._write_stdin(data)

    async def _write_stdin(self, data: bytes) -> None:
        while data:
            written = await self._guest.write_stdin(self.container_id, self.exec_id, data)
            if written <= 0:
                raise UnavailableError(f"failed to write stdin of {self.name}: nothing accepted")
            data = data[written:]



class NoIO:
    """A process with no stdio at all."""

    stdin: InputSource | None = None
    stdout: None = None
    stderr: None = None

    async def close(self) -> None:
        """Nothing to close."""
