"""The ``containerd.task.v2.Task`` ttrpc service: a thin translator onto `sandbox.pod.Pod`.

Theory of operation
-------------------
Each handler turns a protobuf request into plain values (and stdio names into an opener of
endpoints, `shim.stdio`), calls the pod, and builds the protobuf response; protobuf types
stop here (``sandbox/`` never sees them).
Runtime errors are ``sandbox.errors.SandboxError``s carrying their ttrpc code; they become a
``TtrpcError(e.code, str(e))`` in exactly one place, :func:`_translate`, which wraps every
handler. RPCs we do not implement (Pause, Resume, Checkpoint, Update, Stats) answer
UNIMPLEMENTED: never a success that did nothing.

Conventions containerd relies on (see the protocol brief):

- "not exited" timestamps are Go's zero time (seconds=-62135596800), never 0/0;
- ``pid`` is the pod's task pid (the VMM's pid, see `sandbox.pod`) everywhere; guest pids
  only in Pids;
- Connect answers for any id (task_pid 0 for an unknown one, as runc does);
- Shutdown with containers left is a no-op; otherwise the VM is stopped, the reply sent and
  then the daemon exits (``on_shutdown``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protocols import task_pb2, task_types_pb2
from sandbox.errors import InvalidArgumentError, SandboxError
from sandbox.pod import Pod, exec_config
from sandbox.process import Process, State
from sandbox.processio import IoOpener, ProcessIO
from sandbox.types import ContainerConfig, Mount, StdioPaths
from shim import VERSION, metrics
from shim.bundle import read_spec
from shim.events import exit_timestamp
from shim.stdio import open_stdio
from ttrpc import Code, TtrpcError

TASK_SERVICE = "containerd.task.v2.Task"

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Handler = Callable[[Any], Awaitable[Message]]

_STATUS = {
    State.CREATED: task_types_pb2.CREATED,
    State.RUNNING: task_types_pb2.RUNNING,
    State.PAUSED: task_types_pb2.PAUSED,
    State.STOPPED: task_types_pb2.STOPPED,
    State.DELETED: task_types_pb2.UNKNOWN,
}


def _translate(handler: Callable[[Req], Awaitable[Resp]]) -> Callable[[Req], Awaitable[Resp]]:
    """The one place where runtime errors become ttrpc statuses."""

    async def call(request: Req) -> Resp:
        try:
            return await handler(request)
        except SandboxError as e:
            raise TtrpcError(e.code, str(e)) from e

    return call


def _unimplemented(what: str) -> Handler:
    async def refuse(request: Message) -> Message:
        raise TtrpcError(Code.UNIMPLEMENTED, f"failed to {what}: not supported by this runtime")

    return refuse


def _paths(stdin: str, stdout: str, stderr: str, terminal: bool) -> StdioPaths:
    return StdioPaths(stdin=stdin, stdout=stdout, stderr=stderr, terminal=terminal)


def _opener(paths: StdioPaths, container_id: str, namespace: str) -> IoOpener:
    """Opens containerd's endpoints of one process when the pod asks for them."""

    async def open_io() -> ProcessIO:
        return await open_stdio(paths.stdin, paths.stdout, paths.stderr, paths.terminal,
                                container_id, namespace)  # fmt: skip

    return open_io


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError as e:
        raise InvalidArgumentError(f"failed to parse {what}: {e}") from e
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"failed to parse {what}: not a JSON object")
    return value


class TaskService:
    """Handlers of the Task API for one pod."""

    def __init__(self, pod: Pod, namespace: str, on_shutdown: Callable[[], None]) -> None:
        self.pod = pod
        self.namespace = namespace
        self._on_shutdown = on_shutdown

    def methods(self) -> dict[str, tuple[type[Message], Handler]]:
        """Method name -> (request type, handler), for ``ttrpc.Server.register``."""
        implemented: dict[str, tuple[type[Message], Handler]] = {
            "State": (task_pb2.StateRequest, self.state),
            "Create": (task_pb2.CreateTaskRequest, self.create),
            "Start": (task_pb2.StartRequest, self.start),
            "Delete": (task_pb2.DeleteRequest, self.delete),
            "Pids": (task_pb2.PidsRequest, self.pids),
            "Kill": (task_pb2.KillRequest, self.kill),
            "Exec": (task_pb2.ExecProcessRequest, self.exec),
            "ResizePty": (task_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": (task_pb2.CloseIORequest, self.close_io),
            "Wait": (task_pb2.WaitRequest, self.wait),
            "Connect": (task_pb2.ConnectRequest, self.connect),
            "Shutdown": (task_pb2.ShutdownRequest, self.shutdown),
            "Pause": (task_pb2.PauseRequest, self.pause),
            "Resume": (task_pb2.ResumeRequest, self.resume),
            "Update": (task_pb2.UpdateTaskRequest, self.update),
            "Stats": (task_pb2.StatsRequest, self.stats),
        }
        methods = {name: (t, _translate(h)) for name, (t, h) in implemented.items()}
        methods.update({
            "Checkpoint": (task_pb2.CheckpointTaskRequest, _unimplemented("checkpoint task")),
        })  # fmt: skip
        return methods

    async def create(self, r: task_pb2.CreateTaskRequest) -> task_pb2.CreateTaskResponse:
        """Create a container (the first one boots the VM)."""
        if r.checkpoint or r.parent_checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, f"failed to create task {r.id}: no checkpoints")
        bundle = Path(r.bundle)
        config = ContainerConfig(
            container_id=r.id,
            bundle=bundle,
            rootfs=tuple(Mount(m.type, m.source, m.target, tuple(m.options)) for m in r.rootfs),
            spec=read_spec(bundle),
            terminal=r.terminal,
            stdin=bool(r.stdin),
        )
        paths = _paths(r.stdin, r.stdout, r.stderr, r.terminal)
        pid = await self.pod.create(config, paths, _opener(paths, r.id, self.namespace))
        return task_pb2.CreateTaskResponse(pid=pid)

    async def start(self, r: task_pb2.StartRequest) -> task_pb2.StartResponse:
        """Start the init (empty exec id) or an exec."""
        return task_pb2.StartResponse(pid=await self.pod.start(r.id, r.exec_id))

    async def state(self, r: task_pb2.StateRequest) -> task_pb2.StateResponse:
        """Status, stdio and exit of a process."""
        container = self.pod.container(r.id)
        p = container.process(r.exec_id)
        return task_pb2.StateResponse(
            id=p.exec_id or p.container_id,
            bundle=str(container.config.bundle),
            pid=self.pod.task_pid,
            status=_STATUS[p.state],
            stdin=p.paths.stdin,
            stdout=p.paths.stdout,
            stderr=p.paths.stderr,
            terminal=p.paths.terminal,
            exit_status=p.exit_status,
            exited_at=exit_timestamp(p.exited_at_ns),
            exec_id=p.exec_id,
        )

    async def delete(self, r: task_pb2.DeleteRequest) -> task_pb2.DeleteResponse:
        """Delete a stopped process (the init takes the container along)."""
        p = await self.pod.delete(r.id, r.exec_id)
        exited_at = exit_timestamp(p.exited_at_ns)
        return task_pb2.DeleteResponse(
            pid=self.pod.task_pid, exit_status=p.exit_status, exited_at=exited_at
        )

    async def pids(self, r: task_pb2.PidsRequest) -> task_pb2.PidsResponse:
        """Guest pids of the container's processes."""
        pids = await self.pod.pids(r.id)
        return task_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=p) for p in pids])

    async def kill(self, r: task_pb2.KillRequest) -> empty_pb2.Empty:
        """Signal a process, or with ``all`` every process of the container."""
        await self.pod.kill(r.id, r.exec_id, r.signal, r.all)
        return empty_pb2.Empty()

    async def exec(self, r: task_pb2.ExecProcessRequest) -> empty_pb2.Empty:
        """Register an exec process; its spec is an OCI Process as JSON."""
        spec = _json_object(r.spec.value, f"the process spec of exec {r.exec_id}")
        paths = _paths(r.stdin, r.stdout, r.stderr, r.terminal)
        opener = _opener(paths, r.id, self.namespace)
        await self.pod.exec(exec_config(r.id, r.exec_id, spec, paths), paths, opener)
        return empty_pb2.Empty()

    async def resize_pty(self, r: task_pb2.ResizePtyRequest) -> empty_pb2.Empty:
        """Set a process's terminal size."""
        await self.pod.resize(r.id, r.exec_id, r.width, r.height)
        return empty_pb2.Empty()

    async def close_io(self, r: task_pb2.CloseIORequest) -> empty_pb2.Empty:
        """Close a process's stdin (after forwarding what is buffered)."""
        if r.stdin:
            await self.pod.close_stdin(r.id, r.exec_id)
        else:
            self.pod.process(r.id, r.exec_id)  # NOT_FOUND for an unknown process
        return empty_pb2.Empty()

    async def wait(self, r: task_pb2.WaitRequest) -> task_pb2.WaitResponse:
        """Block until the process exits (works before Start)."""
        p: Process = self.pod.process(r.id, r.exec_id)
        await p.wait()
        return task_pb2.WaitResponse(
            exit_status=p.exit_status, exited_at=exit_timestamp(p.exited_at_ns)
        )

    async def pause(self, r: task_pb2.PauseRequest) -> empty_pb2.Empty:
        """Freeze the container (its cgroup in the guest); /tasks/paused follows."""
        await self.pod.pause(r.id)
        return empty_pb2.Empty()

    async def resume(self, r: task_pb2.ResumeRequest) -> empty_pb2.Empty:
        """Thaw it; /tasks/resumed follows."""
        await self.pod.resume(r.id)
        return empty_pb2.Empty()

    async def update(self, r: task_pb2.UpdateTaskRequest) -> empty_pb2.Empty:
        """Apply new OCI LinuxResources to the container in the guest."""
        await self.pod.update(r.id, metrics.linux_resources(r.resources, r.id))
        return empty_pb2.Empty()

    async def stats(self, r: task_pb2.StatsRequest) -> task_pb2.StatsResponse:
        """The container's cgroup v2 metrics, from the guest."""
        return task_pb2.StatsResponse(stats=metrics.metrics_any(await self.pod.stats(r.id)))

    async def connect(self, r: task_pb2.ConnectRequest) -> task_pb2.ConnectResponse:
        """The shim's pid, the task pid and our version."""
        return task_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=self.pod.connect_pid(r.id), version=VERSION
        )

    async def shutdown(self, r: task_pb2.ShutdownRequest) -> empty_pb2.Empty:
        """With no container left: stop the VM and let the daemon exit after replying."""
        if await self.pod.shutdown():
            self._on_shutdown()
        return empty_pb2.Empty()
