"""`VsockBackend`: the shim's handle on one VM's vhost-user-vsock back-end process.

Theory of operation: `start` binds both unix sockets itself (the vhost-user one QEMU
connects to, and the hybrid one the agent client dials), root-only in the sandbox's socket
directory, and listens; then it spawns ``python -m hypervisors.vsock.backend`` (``kata-py -m``
when frozen) behind the parent-death wrapper, handing it the two listening fds. So QEMU and
the agent client may connect at once (the kernel queues them) and no readiness poll is
needed. `stop` terminates the process and removes the sockets; it is idempotent. The VM's
supervisor (`hypervisors.vmm.VmmVm`) treats the back-end's death like virtiofsd's: the VM is
ended, since its agent channel is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from hostos.procs import clean_env, spawn, terminate
from hypervisors.console import StderrLog
from hypervisors.errors import HypervisorError
from hypervisors.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

BACKEND_MODULE = "hypervisors.vsock.backend"


def backend_argv(vhost_fd: int, hybrid_fd: int, guest_cid: int, name: Path) -> list[str]:
    """The back-end's command line (the running interpreter, or the frozen runtime);
    ``name`` (its hybrid socket) only says in logs and ``ps`` whose back-end it is."""
    return [sys.executable, "-m", BACKEND_MODULE, "--vhost-user-fd", str(vhost_fd),
            "--hybrid-fd", str(hybrid_fd), "--guest-cid", str(guest_cid), "--name", str(name)]


def listen_unix(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (a stale file removed first), mode 0600."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


class VsockBackend:
    """One back-end process serving one VM's vsock device."""

    def __init__(self, vhost_socket: Path, hybrid_socket: Path, guest_cid: int,
                 stderr_path: Path) -> None:
        """Describe it; nothing runs until `start`."""
        self.vhost_socket = vhost_socket
        self.hybrid_socket = hybrid_socket
        self.guest_cid = guest_cid
        self.stderr_path = stderr_path
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: StderrLog | None = None

    @property
    def pid(self) -> int | None:
        """The process's pid while started."""
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        """Bind the sockets and spawn the process."""
        with contextlib.ExitStack() as fds:
            try:
                vhost = fds.enter_context(listen_unix(self.vhost_socket))
                hybrid = fds.enter_context(listen_unix(self.hybrid_socket))
                argv = backend_argv(vhost.fileno(), hybrid.fileno(), self.guest_cid,
                                    self.hybrid_socket)
                self._proc = await spawn(argv, asyncio.subprocess.PIPE,
                                         pass_fds=(vhost.fileno(), hybrid.fileno()),
                                         env=clean_env())
            except OSError as exc:
                self._remove_sockets()
                raise HypervisorError(f"failed to start the vsock back-end: {exc}") from exc
        # Our copies of the listeners are closed: the child holds them now.
        self._stderr = StderrLog(self._proc.stderr, self.stderr_path)
        log.info("vsock back-end pid %d for guest CID %d on %s", self._proc.pid,
                 self.guest_cid, self.hybrid_socket)  # fmt: skip

    async def wait(self) -> int:
        """Wait (no deadline: a long poll) until the process exits; its exit status."""
        if self._proc is None:
            raise HypervisorError("failed to wait for the vsock back-end: not started")
        return await self._proc.wait()

    async def stop(self, grace: float = TIMEOUTS.virtiofsd_stop) -> None:
        """Terminate the process (if running) and remove its sockets. Idempotent."""
        if self._proc is not None:
            code = await terminate(self._proc, grace)
            log.debug("vsock back-end pid %d exited with %d", self._proc.pid, code)
        if self._stderr is not None:
            await self._stderr.finished(TIMEOUTS.kill_wait)
            await self._stderr.stop()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for path in (self.vhost_socket, self.hybrid_socket):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
