"""The shim daemon: serves the Task API for one pod until Shutdown or SIGTERM.

Theory of operation
-------------------
``start`` re-executes this program with ``-daemon``, the listening socket on fd 3, /dev/null
as stdio, in a new session, with cwd = the bundle of the pod's first container. The daemon:

1. logs to ``<bundle>/log`` (the FIFO containerd copies into its own log), and moves into
   a mount namespace of its own, a slave of the host's (`sandbox.storage.isolate_mounts`):
   container mounts never reach the host and die with the daemon and its helpers;
2. loads configuration.toml (the path ``start`` resolved; its warnings are logged, and
   ``[runtime] enable_debug`` turns on debug lines as ``-debug`` does), builds the publisher
   (events to ``$TTRPC_ADDRESS``), the `sandbox.pod.Pod` with its `sandbox.Sandbox`, the
   Task service, and the metrics endpoint (`shim.monitor`, which the sandbox serves while
   it runs: docs/metrics.md);
3. runs one asyncio loop serving ttrpc on fd 3 (``Server.serve_listener``). Children (the
   VMM, virtiofsd, binary loggers) are waited for by pid or pidfd; there is no
   ``waitpid(-1)`` reaper and the daemon is not a subreaper;
4. ends when Shutdown finds no container left (its socket file is removed before the reply,
   so containerd can start the next shim of the same id at once; the daemon exits after a
   short grace so the reply is sent), or on SIGTERM/SIGINT (the VM is stopped and running
   processes get their exit published);
5. then stops serving, removes its socket file if still there, flushes queued events and
   exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.config import load_config
from sandbox.errors import SandboxError
from sandbox.pod import Pod
from sandbox.sandbox import Sandbox
from sandbox.storage import isolate_mounts
from shim import log as shimlog
from shim.events import Publisher, TaskEvents
from shim.flags import Flags
from shim.log import kv
from shim.monitor import Monitor
from shim.service import TASK_SERVICE, TaskService
from ttrpc import Server

log = logging.getLogger("shim")

LISTENER_FD = 3
REPLY_GRACE = 0.2


def inherited_listener(fd: int = LISTENER_FD) -> socket.socket:
    """The listening unix socket ``start`` passed on ``fd``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise SandboxError(f"failed to adopt the shim socket on fd {fd}: {e}") from e
    if sock.family != socket.AF_UNIX or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise SandboxError(f"failed to adopt the shim socket on fd {fd}: not a listening socket")
    sock.set_inheritable(False)
    return sock


def run(flags: Flags) -> int:
    """Run the daemon to completion; the process exit code."""
    shimlog.setup_daemon(Path.cwd(), flags.debug, sandbox=flags.sandbox_id or flags.id,
                         namespace=flags.namespace)  # fmt: skip
    try:
        listener = inherited_listener()
    except SandboxError as e:
        log.error("%s (the daemon is started by `start`)", e)
        return 1
    path = str(listener.getsockname())
    release = _socket_releaser(path)
    try:
        isolate_mounts()  # before any thread exists: every later thread shares it
    except OSError as e:
        log.error("failed to make a mount namespace for the sandbox's mounts: %s", e)
        return 1
    _use_pidfd_child_watcher()
    try:
        return asyncio.run(_serve(flags, listener, release))
    except SandboxError as e:
        log.error("shim daemon failed: %s", e)
        return 1
    finally:
        release()
        log.info("shim daemon exited", extra=kv(socket=path))


def _socket_releaser(path: str) -> Callable[[], None]:
    """Remove the daemon's socket once: when Shutdown ends the pod, before its reply, or at
    exit. containerd may start the next shim of the same id (same socket path) as soon as
    Shutdown returns (`ctr run --rm x ...; ctr run x ...`); `start` would otherwise find
    this exiting daemon still listening, hand out its address, and containerd's dial would
    then be refused. runc's shim removes its socket at Shutdown too."""
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            with contextlib.suppress(OSError):
                os.unlink(path)

    return release


def _use_pidfd_child_watcher() -> None:
    """Python 3.11: wait for QEMU and virtiofsd through pidfds, not a thread per child.

    (3.12 and later pick pidfds by themselves and deprecate setting a watcher.)
    """
    if sys.version_info < (3, 12):
        asyncio.get_event_loop_policy().set_child_watcher(asyncio.PidfdChildWatcher())


async def _serve(flags: Flags, listener: socket.socket, release: Callable[[], None]) -> int:
    config = load_config(flags.config_path or None)
    if config.enable_debug:
        logging.getLogger().setLevel(logging.DEBUG)
    for warning in config.warnings:
        log.warning("configuration: %s", warning)
    publisher = Publisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    sandbox = Sandbox(flags.sandbox_id or flags.id, config, namespace=flags.namespace)
    pod = Pod(sandbox, TaskEvents(publisher))
    sandbox.monitor = Monitor(pod).start  # the metrics endpoint, while the VM runs
    shutdown, terminate = asyncio.Event(), asyncio.Event()
    server = Server()

    def on_shutdown() -> None:  # before Shutdown's reply
        release()
        shutdown.set()

    server.register(TASK_SERVICE, TaskService(pod, flags.namespace, on_shutdown).methods())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, terminate.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    log.info("shim daemon serving", extra=kv(pid=os.getpid(), config=config.path))
    serving = asyncio.ensure_future(server.serve_listener(listener))
    ended = [asyncio.ensure_future(e.wait()) for e in (shutdown, terminate)]
    await asyncio.wait([serving, *ended], return_when=asyncio.FIRST_COMPLETED)
    try:
        return await _finish(pod, serving, terminate.is_set())
    except SandboxError as e:
        log.error("failed to stop the sandbox: %s", e)
        return 1
    finally:
        for task in (serving, *ended):
            task.cancel()
        await asyncio.wait([serving, *ended])
        await publisher.close()  # the last exit events still go out


def _dump_tasks() -> None:
    """SIGUSR1: log every asyncio task's await chain (containerd's shims dump goroutines)."""
    for task in asyncio.all_tasks():
        chain: list[str] = []
        coro: Any = task.get_coro()
        while coro is not None and len(chain) < 32:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        log.info("task %s: %s", task.get_name(), " -> ".join(chain) or "(no frames)")


async def _finish(pod: Pod, serving: asyncio.Task[None], terminated: bool) -> int:
    """Stop what must be stopped before the daemon exits; the exit code."""
    if serving.done():
        error = serving.exception() if not serving.cancelled() else None
        log.error("failed to serve the task API: %s", error)
        await pod.terminate()
        return 1
    if terminated:
        log.info("signalled: stopping the sandbox")
        await pod.terminate()
    else:
        await asyncio.sleep(REPLY_GRACE)  # let the Shutdown reply reach containerd
    return 0
