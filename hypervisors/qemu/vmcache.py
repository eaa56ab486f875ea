"""The VM cache (``[factory] vm_cache_number``): VMs booted ahead, handed to pods.

Theory of operation
-------------------
`VmCache` is the daemon ``kata-runtime factory init`` runs when ``vm_cache_number`` > 0.
It keeps that many VMs booted to the point where their agent serves, each shaped as a
template is (`hypervisors.qemu.template.template_view`: a pod's command line without its
devices, empty PCIe root ports, the smallest size a pod may have) but on a private memfd
of its own, and serves a root-only unix socket (``vm_cache_endpoint``). The daemon never
talks to a cached guest's agent: it waits for the agent's mark on the console.

A pod's shim (`hypervisors.qemu.vm.Qemu` with ``VmSpec.vm_cache``) asks for the cache's
shape, checks that its pod fits (as for a template), and claims a VM
(`hypervisors.vmcache_wire` has the exchange). The daemon closes its QMP connection and
hands over the owner socket of the VM's holder and the guest console's connection; the
shim moves the VM's sockets (QMP, agent, debug console) into its own socket directory,
opens the QEMU by pidfd (`hostos.adopted`), plugs the pod's share and NICs, grows it, and
the sandbox hands the guest over as after a template restore (clock, RNG reseed, vCPUs and
memory online). The daemon boots a replacement.

Lifetimes: each QEMU runs under a holder (`kata-vm-holder`, hostos/holder.c, spawned through
`hypervisors.held`), its parent, which kills it when nobody holds the holder's owner
socket any more. The daemon holds it until the hand-over, the pod's shim from then on: a
daemon killed with ``-9`` takes the VMs nobody took along and leaves the pods' VMs
running, and a shim killed with ``-9`` takes its VM along. On SIGTERM (or a ``stop``
request) the daemon stops the VMs nobody took and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hostos.adopted import AdoptedProcess, wait_readable
from hostos.procs import start_time
from hostos.slots import host_cpus
from hypervisors import held
from hypervisors import vmcache_wire as wire
from hypervisors.base import VmSpec
from hypervisors.errors import HypervisorError
from hypervisors.qemu import template as tpl
from hypervisors.qemu.config import QemuConfig
from hypervisors.statepaths import StatePaths

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 180.0
RETRY_AFTER = 5.0
CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 5.0
LOCK_FILE = ".lock"
VM_DIR = re.compile(r"vm-[0-9]{1,9}")
#: The sockets a claimed VM's QEMU listens on, moved into the pod's socket directory.
MOVED = ("qmp_socket", "agent_socket", "debug_console_socket")


def vm_dirs(endpoint: Path) -> Path:
    """Where the cache behind ``endpoint`` keeps its VMs (and its lock): ``<endpoint>.d``,
    a directory of its own, root's and 0700."""
    return Path(f"{endpoint}.d")


def _try_lock(directory: Path) -> int | None:
    """The cache's lock in ``directory`` (an fd to keep), None while a cache holds it."""
    fd = os.open(directory / LOCK_FILE,
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_vm_dirs(directory: Path) -> None:
    """VM directories a killed daemon left: the VMs no pod took died with it, those pods
    took run on without them (their sockets are in the pods' directories)."""
    for entry in os.scandir(directory):
        if VM_DIR.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)


def remove_leftovers(endpoint: Path) -> bool:
    """What a cache killed at ``endpoint`` left (its socket, its VMs' directories, its lock
    and directory), unless a cache serves there; False if nothing was left."""
    directory = vm_dirs(endpoint)
    if not directory.is_dir() or directory.is_symlink():
        return False  # a cache makes it first, and it goes last
    fd = _try_lock(directory)
    if fd is None:
        return False  # a cache serves (or is stopping): its own to clean
    try:
        _remove_vm_dirs(directory)
        if endpoint.is_socket():  # no cache listens on it: we hold the lock
            endpoint.unlink()
        with contextlib.suppress(OSError):  # anything else in it stays, and so does it
            (directory / LOCK_FILE).unlink()
            directory.rmdir()
    finally:
        os.close(fd)
    return True


# -- the shim's side ----------------------------------------------------------------------


@dataclasses.dataclass
class Lease:
    """A VM claimed from the cache, ours while we hold its holder's owner socket
    (`kata-vm-holder`, hostos/holder.c); its QEMU by pidfd, its console connection."""

    claimed: wire.Claimed
    shape: tpl.Template
    console_fd: int | None
    process: AdoptedProcess
    owner: socket.socket
    reader: asyncio.Task[None]

    async def close(self) -> None:
        """Let the VM go (its holder kills it if it still runs)."""
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        self.owner.close()
        self.process.close()
        fd, self.console_fd = self.console_fd, None
        if fd is not None:
            os.close(fd)


async def claim(endpoint: Path, sandbox_id: str,
                fits: Callable[[tpl.Template], str | None]) -> Lease | None:
    """A cached VM for ``sandbox_id`` if the cache has one ``fits`` accepts (it says why
    not, or None); None otherwise, with the reason logged."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        return await _claim(sock, endpoint, sandbox_id, fits)
    except (OSError, TimeoutError, wire.WireError) as e:
        log.info("VM %s boots: no VM from the VM cache at %s: %s", sandbox_id, endpoint,
                 e.strerror if isinstance(e, OSError) and e.strerror else e)
        return None
    finally:
        sock.close()  # the VM's life hangs on its holder's socket, not on this one


async def _claim(sock: socket.socket, endpoint: Path, sandbox_id: str,
                 fits: Callable[[tpl.Template], str | None]) -> Lease | None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_TIMEOUT):
        await loop.sock_connect(sock, str(endpoint))
    await loop.sock_sendall(sock, wire.encode({"op": "describe"}))
    reply, rest, fds = await _receive(sock, b"")
    _close_all(fds)
    shape = _shape(reply)
    why = fits(shape)
    if why:
        log.info("VM %s boots: the VM cache's VMs do not fit it: %s", sandbox_id, why)
        return None
    await loop.sock_sendall(sock, wire.encode({"op": "claim", "sandbox": sandbox_id}))
    reply, rest, fds = await _receive(sock, rest)
    error = wire.reply_error(reply)
    if error:
        _close_all(fds)
        log.info("VM %s boots: the VM cache has no VM for it: %s", sandbox_id, error)
        return None
    owner: socket.socket | None = None
    try:
        claimed = wire.claimed(reply)
        if not 1 <= len(fds) <= 2:
            raise wire.WireError(f"a VM cache claim reply carries {len(fds)} fds, not the "
                                 "holder's socket and the console")
        owner = socket.socket(fileno=fds[0])
        owner.setblocking(False)
        status: asyncio.Future[int] = loop.create_future()
        process = AdoptedProcess.open(claimed.pid, status)
        if start_time(claimed.pid) != claimed.start_time:  # opened another process
            process.close()
            raise wire.WireError(f"the VM cache's VM pid {claimed.pid} is gone")
    except BaseException:
        if owner is not None:
            owner.close()  # its holder kills the VM
            fds = fds[1:]
        _close_all(fds)
        raise
    reader = asyncio.ensure_future(held.watch(owner, status))
    return Lease(claimed, shape, fds[1] if len(fds) > 1 else None, process, owner, reader)


def _shape(reply: dict[str, Any]) -> tpl.Template:
    error = wire.reply_error(reply)
    if error:
        raise wire.WireError(error)
    try:
        return tpl.Template(**reply["vm"])
    except (KeyError, TypeError) as e:
        raise wire.WireError(f"the VM cache described its VMs in a form this version does "
                             f"not read: {e}") from e


async def _receive(sock: socket.socket, buffer: bytes) -> tuple[dict[str, Any], bytes,
                                                                  list[int]]:
    """The next message, what came after it, and the fds that came with it."""
    fds: list[int] = []
    async with asyncio.timeout(REPLY_TIMEOUT):
        while True:
            line, rest = wire.split_line(buffer)
            if line is not None:
                return wire.decode(line), rest, fds
            await wait_readable(sock.fileno())
            try:
                data, more, _flags, _addr = socket.recv_fds(sock, 4096, 4)
            except BlockingIOError:
                continue
            fds += more
            if not data:
                _close_all(fds)
                raise ConnectionResetError(0, "the VM cache closed the connection")
            buffer += data


def move_sockets(cache_dir: Path, claimed: wire.Claimed, paths: StatePaths) -> None:
    """Move the claimed VM's listening sockets into ``paths`` (the pod's): the VMM keeps
    listening on them under their new names."""
    vm_dir = Path(claimed.dir)
    if vm_dir.parent != cache_dir or not VM_DIR.fullmatch(vm_dir.name) or vm_dir.is_symlink():
        raise HypervisorError(f"the VM cache handed out a VM in {claimed.dir}, not one of "
                              f"its own directories in {cache_dir}")
    theirs = StatePaths(vm_dir)
    for name in MOVED:
        source, target = getattr(theirs, name), getattr(paths, name)
        try:
            os.rename(source, target)
        except FileNotFoundError:
            continue  # a socket that VM does not have (no debug console)
        except OSError as e:
            raise HypervisorError(f"failed to take the VM cache's VM: moving {source} to "
                                  f"{target}: {e.strerror}") from e


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- the daemon ---------------------------------------------------------------------------


@dataclasses.dataclass
class CachedVm:
    """A VM booted and waiting for a pod."""

    vm: Any  # a caching hypervisors.qemu.vm.Qemu (which imports this module)
    directory: Path
    booted_at: float
    watch: asyncio.Task[None] | None = None


class VmCache:
    """The daemon's state: the VMs ready, those handed out (see the module docstring)."""

    def __init__(self, config: QemuConfig, spec: VmSpec, count: int, endpoint: Path,
                 ready_mark: str, make_vm: Callable[[QemuConfig, VmSpec], Any],
                 parallel: int | None = None) -> None:
        """``spec``: a pod's VM at the smallest size (as a template's); ``make_vm``:
        a cached-mode `Qemu` for a spec; ``parallel``: VMs booting at once at most (the
        CPUs we may run on by default)."""
        self.config, self.spec, self.count = config, spec, count
        self.parallel = parallel or host_cpus()
        self.endpoint, self.ready_mark, self._make_vm = endpoint, ready_mark, make_vm
        self.directory = vm_dirs(endpoint)
        self.ready: deque[CachedVm] = deque()
        self.shape: tpl.Template | None = None
        self.sessions: set[asyncio.Task[None]] = set()
        #: One task per VM handed to a pod, until it exits.
        self.handed: set[asyncio.Task[None]] = set()
        self._serial = 0
        self._stopping = False
        self._changed = asyncio.Event()
        #: Set by a ``stop`` request (`kata-runtime factory destroy`).
        self.stop_requested = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or a ``stop`` request), then stop the VMs nobody
        took."""
        lock = self._lock()
        try:
            self._remove_stale()
            listener = self._listen()
            try:
                await self._serve(listener, stop)
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    self.endpoint.unlink()
            await self._drain()
        finally:
            # Ours alone while we hold the lock: the VMs' directories are gone by now.
            with contextlib.suppress(OSError):
                (self.directory / LOCK_FILE).unlink()
                self.directory.rmdir()
            os.close(lock)

    def _lock(self) -> int:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd = _try_lock(self.directory)
        if fd is None:
            raise HypervisorError(f"a VM cache already serves {self.endpoint}: stop it "
                                  "first (`kata-runtime factory destroy`)")
        return fd

    def _remove_stale(self) -> None:
        _remove_vm_dirs(self.directory)

    def _listen(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            self.endpoint.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.endpoint))
        finally:
            os.umask(old)
        listener.listen(16)
        listener.setblocking(False)
        return listener

    async def _serve(self, listener: socket.socket, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        filler = asyncio.ensure_future(self._fill())
        relay = asyncio.ensure_future(stop.wait())
        relay.add_done_callback(lambda _: self.stop_requested.set())
        stopped = asyncio.ensure_future(self.stop_requested.wait())
        try:
            while True:
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                await asyncio.wait({accept, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stopped.done():
                    accept.cancel()
                    return
                conn, _addr = accept.result()
                task = asyncio.ensure_future(self._session(conn))
                self.sessions.add(task)
                task.add_done_callback(self.sessions.discard)
        finally:
            self._stopping = True
            self._changed.set()
            stopped.cancel()
            relay.cancel()
            filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await filler

    async def _drain(self) -> None:
        """Stop the VMs no pod took; those handed out live on with their pods."""
        while self.ready:
            await self._discard(self.ready.popleft(), "the VM cache stops")
        for task in list(self.handed):
            task.cancel()  # their directories go, their VMs stay
        await asyncio.gather(*self.handed, *self.sessions, return_exceptions=True)

    # -- keeping VMs ready

    async def _fill(self) -> None:
        """Keep ``count`` VMs ready or booting, up to ``parallel`` booting at once (under
        TCG the boot slots, `hostos.slots`, bound that further)."""
        boots: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping:
                while len(self.ready) + len(boots) < self.count and len(boots) < self.parallel:
                    boots.add(asyncio.ensure_future(self._boot_one()))
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                done, _ = await asyncio.wait({changed, *boots},
                                             return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                boots -= done
        finally:
            for boot in boots:
                boot.cancel()
            await asyncio.gather(*boots, return_exceptions=True)

    async def _boot_one(self) -> None:
        try:
            cached = await self._boot()
        except (HypervisorError, OSError) as e:
            log.error("VM cache: a VM failed to boot, retrying in %.0fs: %s", RETRY_AFTER, e)
            await asyncio.sleep(RETRY_AFTER)
            return
        self.ready.append(cached)
        log.info("VM cache: %s ready (%d of %d)", cached.directory.name, len(self.ready),
                 self.count)

    async def _boot(self) -> CachedVm:
        self._serial += 1
        directory = self.directory / f"vm-{self._serial}"
        directory.mkdir(mode=0o700)
        spec = dataclasses.replace(self.spec, sandbox_id=f"vm-cache-{self._serial}",
                                   state_dir=directory, socket_dir=directory,
                                   template_dir=None, vm_cache=None)
        vm = self._make_vm(self.config, spec)
        started = time.monotonic()
        try:
            await vm.start()
            exited = asyncio.ensure_future(vm.wait_exited())
            try:
                await tpl.wait_for_mark(vm.console_log, self.ready_mark, exited, BOOT_TIMEOUT)
            finally:
                exited.cancel()
            vm.booted()
        except BaseException:
            await vm.stop()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        if self.shape is None:
            self.shape = vm.cache_shape(time.monotonic() - started)
        cached = CachedVm(vm, directory, time.time())
        cached.watch = asyncio.ensure_future(self._watch(cached))
        return cached

    async def _watch(self, cached: CachedVm) -> None:
        """A ready VM that dies is dropped (and replaced)."""
        code = await cached.vm.wait_exited()
        if cached in self.ready:
            self.ready.remove(cached)
            log.warning("VM cache: %s exited (status %s) before a pod took it",
                        cached.directory.name, code)
            await self._discard(cached, "")
            self._changed.set()

    async def _discard(self, cached: CachedVm, why: str) -> None:
        if why:
            log.info("VM cache: stopping %s: %s", cached.directory.name, why)
        if cached.watch is not None and cached.watch is not asyncio.current_task():
            cached.watch.cancel()
        await cached.vm.stop()
        shutil.rmtree(cached.directory, ignore_errors=True)

    # -- serving shims

    async def _session(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            buffer = b""
            while True:
                message, buffer = await self._next(conn, buffer)
                if message is None:
                    return
                try:
                    op, sandbox = wire.request_op(message)
                except wire.WireError as e:
                    await loop.sock_sendall(conn, wire.encode({"ok": False, "error": str(e)}))
                    return
                if op == "describe":
                    await loop.sock_sendall(conn, self._describe())
                    continue
                if op == "stop":
                    log.info("VM cache: asked to stop")
                    await loop.sock_sendall(conn, wire.encode({"ok": True}))
                    self.stop_requested.set()
                    return
                await self._hand_over(conn, sandbox)
                return
        except (OSError, wire.WireError, TimeoutError) as e:
            log.warning("VM cache: a client session failed: %s", e)
        finally:
            conn.close()

    async def _next(self, conn: socket.socket,
                    buffer: bytes) -> tuple[dict[str, Any] | None, bytes]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                line, buffer = wire.split_line(buffer)
                if line is not None:
                    return wire.decode(line), buffer
                data = await loop.sock_recv(conn, 4096)
                if not data:
                    return None, buffer
                buffer += data

    def _describe(self) -> bytes:
        counts = {"ready": len(self.ready), "count": self.count,
                  "claimed": len(self.handed)}
        if self.shape is None:
            return wire.encode({"ok": False, "error": "no VM has booted yet", **counts})
        return wire.encode({"ok": True, "vm": dataclasses.asdict(self.shape), **counts})

    async def _hand_over(self, conn: socket.socket, sandbox: str) -> None:
        loop = asyncio.get_running_loop()
        if not self.ready:
            await loop.sock_sendall(conn, wire.encode(
                {"ok": False, "error": f"all {self.count} VMs are taken; more are booting"}))
            return
        cached = self.ready.popleft()
        if cached.watch is not None:
            cached.watch.cancel()
        self._changed.set()  # boot a replacement
        vm = cached.vm
        owner, console = await vm.release_for_adoption()
        fds = [owner] if console is None else [owner, console]
        try:
            pid = vm.pid
            started = start_time(pid) if pid is not None else None
            if pid is None or started is None:
                raise HypervisorError(f"{cached.directory.name} exited before it was claimed")
            reply = wire.encode({"ok": True, "pid": pid, "start_time": started,
                                 "dir": str(cached.directory), "accelerator": vm.accelerator,
                                 "reason": vm.accelerator_reason})
            socket.send_fds(conn, [reply], fds)
        except (OSError, HypervisorError) as e:
            log.warning("VM cache: handing %s to %s failed: %s", cached.directory.name,
                        sandbox, e)
        else:
            log.info("VM cache: %s handed to sandbox %s (ready %.1fs)", cached.directory.name,
                     sandbox, time.time() - cached.booted_at)
        finally:
            _close_all(fds)  # the shim holds the VM now (or nobody: its holder kills it)
        task = asyncio.ensure_future(self._forget(cached))
        self.handed.add(task)
        task.add_done_callback(self.handed.discard)

    async def _forget(self, cached: CachedVm) -> None:
        """A VM handed out is its pod's: once it exits, its directory here goes."""
        try:
            await cached.vm.wait_exited()
        finally:
            await self._discard(cached, "")
