"""virtiofsd: the vhost-user daemon that serves the shared directory to the guest.

Theory of operation: `Virtiofsd.start` spawns the C virtiofsd shipped with QEMU
(``/usr/lib/qemu/virtiofsd --socket-path=S -o source=DIR -o cache=MODE [extra]``) as our
child (behind the parent-death wrapper, see `hostos.procs`), then polls until its socket
appears. If the daemon exits first, the error quotes the tail of its stderr file. QEMU must
connect only after the socket exists. One daemon serves one VM boot: it exits by itself when
QEMU disconnects. `Virtiofsd.stop` is idempotent: SIGTERM, SIGKILL after a grace period,
then it removes the socket and the lock file the daemon leaves in /var/run/virtiofsd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from hostos.procs import spawn, terminate
from hypervisors.console import StderrLog
from hypervisors.errors import HypervisorError, HypervisorTimeout
from hypervisors.timeouts import TIMEOUTS

log = logging.getLogger(__name__)

#: The C virtiofsd keeps a lock file per socket here and does not remove it on exit.
VIRTIOFSD_RUN_DIR = Path("/var/run/virtiofsd")


def virtiofsd_argv(
    daemon: str, socket: Path, source: Path, cache: str, extra: Sequence[str] = ()
) -> list[str]:
    """The virtiofsd command line."""
    return [daemon, f"--socket-path={socket}", "-o", f"source={source}", "-o", f"cache={cache}",
            *extra]


def lock_file(socket: Path) -> Path:
    """The pid/lock file the C virtiofsd leaves in /var/run/virtiofsd for ``socket``."""
    return VIRTIOFSD_RUN_DIR / (str(socket).replace("/", ".") + ".pid")


def tail(path: Path, lines: int = 10) -> str:
    """The last ``lines`` lines of a (small) log file, or a note if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(text.strip().splitlines()[-lines:]) or f"({path} is empty)"


class Virtiofsd:
    """One virtiofsd process serving ``source`` on ``socket``."""

    def __init__(
        self, daemon: str, socket: Path, source: Path, cache: str,
        extra_args: Sequence[str] = (), stderr_path: Path | None = None,
    ) -> None:
        """Describe the daemon; nothing runs until `start`."""
        self.socket = socket
        self.argv = virtiofsd_argv(daemon, socket, source, cache, extra_args)
        self.stderr_path = stderr_path or socket.with_suffix(".stderr")
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: StderrLog | None = None

    @property
    def pid(self) -> int | None:
        """The daemon's pid while started."""
        return self._proc.pid if self._proc else None

    async def start(self, timeout: float = TIMEOUTS.virtiofsd_socket) -> None:
        """Spawn the daemon and wait until its socket exists."""
        self.socket.unlink(missing_ok=True)
        try:
            self._proc = await spawn(self.argv, asyncio.subprocess.PIPE)
        except OSError as exc:
            raise HypervisorError(f"failed to start virtiofsd {self.argv[0]}: {exc}") from exc
        self._stderr = StderrLog(self._proc.stderr, self.stderr_path)
        try:
            await self._wait_socket(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_socket(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self._proc.returncode is not None:
                if self._stderr is not None:
                    await self._stderr.finished(TIMEOUTS.kill_wait)
                raise HypervisorError(
                    f"failed to start virtiofsd: exited with {self._proc.returncode} before "
                    f"creating {self.socket}; stderr:\n{tail(self.stderr_path)}"
                )
            if time.monotonic() > deadline:
                raise HypervisorTimeout(
                    f"failed to start virtiofsd: no socket {self.socket} after {timeout:g}s; "
                    f"stderr:\n{tail(self.stderr_path)}"
                )
            await asyncio.sleep(TIMEOUTS.poll_interval)

    async def wait(self) -> int:
        """Wait (no deadline: a long poll) until the daemon exits; its exit status."""
        if self._proc is None:
            raise HypervisorError("failed to wait for virtiofsd: not started")
        return await self._proc.wait()

    async def stop(self, grace: float = TIMEOUTS.virtiofsd_stop) -> None:
        """Terminate the daemon (if running), remove its socket and lock file. Idempotent."""
        if self._proc is not None:
            code = await terminate(self._proc, grace)
            log.debug("virtiofsd pid %d exited with %d", self._proc.pid, code)
        if self._stderr is not None:
            await self._stderr.finished(TIMEOUTS.kill_wait)
            await self._stderr.stop()
        for path in (self.socket, lock_file(self.socket)):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
