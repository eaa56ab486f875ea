"""Containers in the guest: create/start/exec/signal/remove through crun.

Theory of operation
-------------------
:class:`Containers` is the registry the API handlers call. A container has a bundle dir
``<run_dir>/<cid>/`` (config.json, pid files, crun logs, process-<exec>.json), an init
:class:`~agent.process.Process` and a table of exec processes.

* create: rewrite the spec (:mod:`agent.spec`), ``crun create`` with the init's stdio, read
  the pid file, register the pid with the reaper (the init is reparented to us when crun
  exits; its exit may even precede the registration, which the reaper tolerates). Any
  failure undoes everything (``crun delete --force``, bundle removed) and reports crun's
  own message.
* start: ``crun start``; the init goes CREATED -> RUNNING.
* exec: ``crun exec --detach --pid-file ... --process <json>``; the exec'd process is
  reparented to us too.
* signal ``all`` and ListProcesses read the container's cgroup (``cgroup.procs``,
  recursively) instead of spawning crun: a fork+exec costs ~20x under TCG.
* remove: SIGKILL everything, wait for the init, ``crun delete --force``, close the
  streams, remove the bundle.

The id is reserved in the registry before the first ``await`` so that two concurrent
creates of one id cannot both proceed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from typing import Any, NamedTuple

from agent import cgroup, validate
from agent.crun import Crun, CrunConfig, CrunError
from agent.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from agent.process import Process, State, StdioSetup
from agent.reaper import Reaper
from agent.spec import (
    check_process,
    grant_guest_devices,
    guest_devices,
    is_privileged,
    parse_json_object,
    pod_sandbox_id,
    rewrite_spec,
    sysctl_path,
    take_net_sysctls,
)

# crun hands the pty master over within its own run; this bounds a crun that never does.
_CONSOLE_TIMEOUT = 30.0


class RuntimeConfig(NamedTuple):  # see agent.crun.CrunConfig: why not a dataclass
    run_dir: str = "/run/kata-containers"
    cgroup_root: str = "/sys/fs/cgroup"
    cgroup_parent: str = "/kata"  # "" = no cgroups (crun --cgroup-manager=disabled)
    crun: CrunConfig = CrunConfig()
    #: Process output answered in larger pieces (the host asks under TCG: agent.streams).
    gather_output: bool = False


class Container:
    def __init__(self, container_id: str, bundle: str, terminal: bool) -> None:
        self.id = container_id
        self.bundle = bundle
        self.init = Process(container_id, "", terminal)
        self.execs: dict[str, Process] = {}
        self.cgroup_dir: str | None = None

    def process(self, exec_id: str) -> Process:
        if exec_id == "":
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise NotFound(f"exec {exec_id!r} not found in container {self.id!r}") from None

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    def path(self, name: str) -> str:
        return os.path.join(self.bundle, name)


class Containers:
    """Every container of the sandbox, keyed by id."""

    def __init__(self, config: RuntimeConfig, reaper: Reaper) -> None:
        self.config = config
        self._reaper = reaper
        self._crun = Crun(config.crun, reaper)
        self._containers: dict[str, Container] = {}
        self._console_seq = 0

    def get(self, container_id: str) -> Container:
        validate.check_id("container_id", container_id)
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFound(f"container {container_id!r} not found") from None

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.get(container_id).process(validate.check_exec_id(exec_id))

    def ids(self) -> list[str]:
        return list(self._containers)

    def _sandbox_pid(self, sandbox_id: str | None) -> int | None:
        """The init pid of a pod's running sandbox container, whose namespaces the pod's
        other containers join; None when there is none."""
        sandbox = self._containers.get(sandbox_id) if sandbox_id else None
        if sandbox is None or sandbox.init.pid <= 0 or sandbox.init.exited:
            return None
        return sandbox.init.pid

    # -- create / start ---------------------------------------------------------------

    async def create(
        self, container_id: str, spec_json: bytes, terminal: bool, stdin: bool
    ) -> Container:
        validate.check_id("container_id", container_id)
        validate.check_size("oci_spec_json", len(spec_json), validate.MAX_SPEC)
        if container_id in self._containers:
            raise AlreadyExists(f"container {container_id!r} already exists")
        cfg = self.config
        raw_spec = parse_json_object("oci_spec_json", spec_json)
        spec = rewrite_spec(raw_spec, container_id, cfg.run_dir, cfg.cgroup_parent or None,
                            terminal, self._sandbox_pid(pod_sandbox_id(raw_spec)))
        net_sysctls = take_net_sysctls(spec)
        if is_privileged(spec):
            grant_guest_devices(spec, guest_devices(_dev_entries()))
        container = Container(container_id, os.path.join(cfg.run_dir, container_id), terminal)
        self._containers[container_id] = container  # reserve the id (see module docstring)
        try:
            _write_sysctls(net_sysctls)
            await self._create(container, spec, stdin)
        except BaseException:
            del self._containers[container_id]
            await self._discard(container)
            raise
        return container

    async def _create(self, container: Container, spec: dict[str, Any], stdin: bool) -> None:
        try:
            os.makedirs(container.bundle, mode=0o700)
        except FileExistsError:
            raise AlreadyExists(f"bundle {container.bundle} already exists") from None
        _write_json(container.path("config.json"), spec)
        if self.config.cgroup_parent:
            cgroups_path = spec["linux"]["cgroupsPath"].lstrip("/")
            container.cgroup_dir = os.path.join(self.config.cgroup_root, cgroups_path)
        pid_file = container.path("init.pid")
        args = ["create", "--bundle", container.bundle, "--pid-file", pid_file]
        await self._run_with_stdio(container.init, args, container.id, stdin, pid_file)

    async def start(self, container_id: str) -> int:
        container = self.get(container_id)
        init = container.init
        if init.state is not State.CREATED:
            raise FailedPrecondition(f"container {container_id!r} is {init.state.value}")
        await self._crun.run(container.path("crun-start.log"), ["start", container_id],
                             _devnull_stdio())
        if not init.exited:
            init.state = State.RUNNING
        return init.pid

    # -- exec -------------------------------------------------------------------------

    async def exec(self, container_id: str, exec_id: str, process_json: bytes,
                   stdin: bool) -> int:
        container = self.get(container_id)
        validate.check_id("exec_id", exec_id)
        validate.check_size("process_json", len(process_json), validate.MAX_SPEC)
        if container.init.state is not State.RUNNING:
            raise FailedPrecondition(
                f"container {container_id!r} is {container.init.state.value}, not running")
        old = container.execs.get(exec_id)
        if old is not None and not old.exited:
            raise AlreadyExists(f"exec {exec_id!r} already exists in {container_id!r}")
        spec = check_process(parse_json_object("process_json", process_json))
        terminal = bool(spec.get("terminal"))
        process = Process(container_id, exec_id, terminal)
        container.execs[exec_id] = process  # reserve the id
        try:
            await self._exec(container, process, spec, stdin)
        except BaseException:
            container.execs.pop(exec_id, None)
            if old is not None:
                container.execs[exec_id] = old
            raise
        if old is not None:
            await old.close_streams()
        return process.pid

    async def remove_exec(self, container_id: str, exec_id: str) -> None:
        """Forget an exec that has exited and release its streams."""
        container = self.get(container_id)
        validate.check_id("exec_id", exec_id)
        process = container.execs.get(exec_id)
        if process is None:
            raise NotFound(f"exec {exec_id!r} not found in {container_id!r}")
        if not process.exited:
            raise FailedPrecondition(f"exec {exec_id!r} in {container_id!r} is still running")
        del container.execs[exec_id]
        await process.close_streams()

    async def _exec(self, container: Container, process: Process, spec: dict[str, Any],
                    stdin: bool) -> None:
        json_path = container.path(f"process-{process.exec_id}.json")
        pid_file = container.path(f"exec-{process.exec_id}.pid")
        _write_json(json_path, spec)
        args = ["exec", "--detach", "--pid-file", pid_file, "--process", json_path]
        try:
            await self._run_with_stdio(process, args, container.id, stdin, pid_file)
        finally:
            _unlink(json_path)
        process.state = State.RUNNING if not process.exited else State.EXITED

    # -- crun with stdio --------------------------------------------------------------

    async def _run_with_stdio(self, process: Process, args: list[str], container_id: str,
                              stdin: bool, pid_file: str) -> None:
        """crun create/exec with the process's stdio wired; then bind the process's pid."""
        console_path = self._console_path() if process.terminal else ""
        stdio = StdioSetup(process.terminal, stdin, console_path)
        if process.terminal:
            args = [*args, "--console-socket", console_path]
        log = os.path.join(os.path.dirname(pid_file), f"crun-{process.exec_id or 'init'}.log")
        try:
            master = await self._run_crun(stdio, log, [*args, container_id])
            pid = _read_pid(pid_file)
        except BaseException:
            stdio.abort()
            raise
        process.attach(pid, self._reaper.register(pid))
        stdio.close_child_ends()
        stdio.hand_over(process, master, self.config.gather_output)

    async def _run_crun(self, stdio: StdioSetup, log: str, args: list[str]) -> int | None:
        run = asyncio.ensure_future(self._crun.run(log, args, stdio.child_stdio))
        if not stdio.terminal:
            await run
            return None
        receive = asyncio.ensure_future(stdio.receive_master())
        try:
            await run  # crun connects and sends the master before it exits successfully
            return await asyncio.wait_for(receive, _CONSOLE_TIMEOUT)
        finally:
            receive.cancel()
            run.cancel()

    def _console_path(self) -> str:
        # A short name: unix socket paths are limited to 107 bytes and ids may be 128.
        self._console_seq += 1
        directory = os.path.join(self.config.run_dir, ".console")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.path.join(directory, f"{self._console_seq}.sock")

    # -- cgroup: freeze, resources, statistics ---------------------------------------

    def _cgroup_dir(self, container: Container) -> str:
        if container.cgroup_dir is None:
            raise FailedPrecondition(f"container {container.id!r} has no cgroup "
                                     "(the agent runs without cgroups)")
        return container.cgroup_dir

    async def pause(self, container_id: str) -> None:
        container = self.get(container_id)
        self._cgroup_dir(container)
        await self._crun.run(container.path("crun-pause.log"), ["pause", container_id],
                             _devnull_stdio())

    async def resume(self, container_id: str) -> None:
        container = self.get(container_id)
        self._cgroup_dir(container)
        await self._crun.run(container.path("crun-resume.log"), ["resume", container_id],
                             _devnull_stdio())

    async def update(self, container_id: str, resources_json: bytes) -> None:
        """Apply OCI LinuxResources to a container (``crun update``)."""
        container = self.get(container_id)
        self._cgroup_dir(container)
        validate.check_size("resources_json", len(resources_json), validate.MAX_SPEC)
        resources = parse_json_object("resources_json", resources_json)
        path = container.path("resources.json")
        _write_json(path, resources)
        await self._crun.run(container.path("crun-update.log"),
                             ["update", f"--resources={path}", container_id], _devnull_stdio())

    def stats(self, container_id: str) -> dict[str, object]:
        return cgroup.stats(self._cgroup_dir(self.get(container_id)))

    def oom_killed(self, container_id: str, exec_id: str) -> bool:
        """Whether a container's init process ended with an OOM kill in its cgroup."""
        container = self._containers.get(container_id)
        if exec_id or container is None or container.cgroup_dir is None:
            return False
        return cgroup.oom_kills(container.cgroup_dir) > 0

    # -- signals and pids -------------------------------------------------------------

    def signal(self, container_id: str, exec_id: str, sig: int, all_processes: bool) -> None:
        validate.check_signal(sig)
        if not all_processes:
            self.process(container_id, exec_id).signal(sig)
            return
        for pid in self.pids(container_id):
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, sig)

    def pids(self, container_id: str) -> list[int]:
        container = self.get(container_id)
        if container.cgroup_dir is not None:
            return _cgroup_pids(container.cgroup_dir)
        # Without cgroups (host tests) only the processes we started are known.
        return [p.pid for p in container.processes() if p.pid and not p.exited]

    # -- remove -----------------------------------------------------------------------

    async def remove(self, container_id: str, timeout: float | None = None,
                     keep_state: bool = False) -> None:
        """Kill what is left of a container, wait for it, and forget it; with ``keep_state``
        (the VM stops next) leave crun's state, the bundle and the cgroup as they are."""
        container = self.get(container_id)
        live = [p for p in container.processes() if p.pid and not p.exited]
        if live:
            self.signal(container_id, "", signal.SIGKILL, all_processes=True)
            for p in live:
                p.signal_quietly(signal.SIGKILL)
            try:
                await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), timeout)
            except TimeoutError:
                raise FailedPrecondition(
                    f"container {container_id!r} did not exit within {timeout}s") from None
        if self._containers.pop(container_id, None) is None:  # a concurrent remove won
            return
        if keep_state:
            for p in container.processes():
                await p.close_streams()
        else:
            await self._discard(container)

    async def remove_all(self, keep_state: bool = False) -> None:
        """Remove every container; one that fails does not keep the others alive."""
        failures: list[str] = []
        for container_id in self.ids():
            try:
                await self.remove(container_id, timeout=10.0, keep_state=keep_state)
            except AgentError as e:
                failures.append(f"{container_id}: {e}")
        if failures:
            raise FailedPrecondition("failed to remove containers: " + "; ".join(failures))

    async def _discard(self, container: Container) -> None:
        """Forget a container's crun state, streams and bundle (best effort, idempotent)."""
        for p in container.processes():
            await p.close_streams()
        if os.path.isdir(container.bundle):
            try:
                await self._crun.run(container.path("crun-delete.log"),
                                     ["delete", "--force", container.id], _devnull_stdio())
            except CrunError as exc:
                if "does not exist" not in str(exc) and "No such file" not in str(exc):
                    raise
            _rmtree(container.bundle)
        if container.cgroup_dir is not None:
            # A failed `crun create` is unknown to `crun delete` but may have made the cgroup.
            with contextlib.suppress(OSError):
                os.rmdir(container.cgroup_dir)


def _cgroup_pids(cgroup_dir: str) -> list[int]:
    pids: list[int] = []
    for dirpath, _dirs, _files in os.walk(cgroup_dir):
        try:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                pids.extend(int(line) for line in f if line.strip())
        except OSError:
            continue  # the cgroup went away meanwhile
    return pids


def _rmtree(top: str) -> None:
    """Remove a bundle dir (flat, agent-written files). Not shutil: it imports bz2/lzma."""
    for dirpath, dirs, files in os.walk(top, topdown=False):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(dirpath, name))
        for name in dirs:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                os.unlink(path) if os.path.islink(path) else os.rmdir(path)
    with contextlib.suppress(OSError):
        os.rmdir(top)


def _read_pid(pid_file: str) -> int:
    try:
        with open(pid_file) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"crun left no valid pid file {pid_file}: {exc}") from exc


def _dev_entries(dev: str = "/dev") -> list[tuple[str, str, int, int, int]]:
    """(name, c|b, major, minor, permission bits) of the device nodes directly in /dev."""
    found = []
    for entry in os.scandir(dev):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            found.append((entry.name, kind, os.major(st.st_rdev), os.minor(st.st_rdev),
                          stat.S_IMODE(st.st_mode)))
    return found


def _write_sysctls(sysctls: dict[str, str]) -> None:
    """Set sysctls on the VM itself (names already checked by take_net_sysctls)."""
    for name, value in sysctls.items():
        try:
            fd = os.open(sysctl_path(name), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidArgument(f"sysctl {name}: {e.strerror}") from None
        try:
            os.write(fd, value.encode())
        except OSError as e:
            raise InvalidArgument(f"sysctl {name}={value}: {e.strerror}") from None
        finally:
            os.close(fd)


def _write_json(path: str, value: dict[str, Any]) -> None:
    import json

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        json.dump(value, f)


def _devnull_stdio() -> tuple[int, int, int]:
    fd = _devnull()
    return fd, fd, fd


_DEVNULL: list[int] = []


def _devnull() -> int:
    # One /dev/null fd for the agent's lifetime: crun start/delete need no stdio.
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    return _DEVNULL[0]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
