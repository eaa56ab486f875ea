"""The files a VM keeps in its sandbox's state directory, for every hypervisor alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The debug console socket's name in a sandbox's socket dir (``kata-runtime exec`` dials it).
DEBUG_CONSOLE_SOCKET = "debug-console.sock"


@dataclass(frozen=True)
class StatePaths:
    """Files a VM keeps in its state directory, and its sockets (in ``socket_dir``, a
    shorter path, when given)."""

    state_dir: Path
    socket_dir: Path | None = None

    @property
    def _sockets(self) -> Path:
        return self.socket_dir or self.state_dir

    @property
    def qmp_socket(self) -> Path:
        """QMP control socket (the VMM listens)."""
        return self._sockets / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        """Host end of the virtio-serial agent port (the VMM listens)."""
        return self._sockets / "agent.sock"

    @property
    def debug_console_socket(self) -> Path:
        """Host end of the debug console's virtio-serial port (the VMM listens)."""
        return self._sockets / DEBUG_CONSOLE_SOCKET

    @property
    def virtiofsd_socket(self) -> Path:
        """vhost-user socket (virtiofsd listens, the VMM connects)."""
        return self._sockets / "virtiofsd.sock"

    @property
    def vsock_socket(self) -> Path:
        """vhost-user socket of the vsock device (our back-end listens, the VMM connects)."""
        return self._sockets / "vhost-vsock.sock"

    @property
    def hybrid_vsock_socket(self) -> Path:
        """The vsock back-end's host side: ``CONNECT <port>`` here reaches a guest port."""
        return self._sockets / "vsock.sock"

    @property
    def vsock_backend_stderr(self) -> Path:
        """The vsock back-end's standard error (its log)."""
        return self.state_dir / "vsock-backend.stderr"

    @property
    def console_log(self) -> Path:
        """Guest serial console output."""
        return self.state_dir / "console.log"

    @property
    def console_socket(self) -> Path:
        """Where the VMM's serial chardev connects (we listen and copy to console_log)."""
        return self._sockets / "console.sock"

    @property
    def vmm_pidfile(self) -> Path:
        """The VMM's pid file."""
        return self.state_dir / "vmm.pid"

    @property
    def vmm_stderr(self) -> Path:
        """The VMM's standard error."""
        return self.state_dir / "vmm.stderr"

    @property
    def virtiofsd_stderr(self) -> Path:
        """virtiofsd's standard error."""
        return self.state_dir / "virtiofsd.stderr"

    def sockets(self) -> tuple[Path, ...]:
        """Every socket path a VM may create (removed on stop)."""
        return (self.qmp_socket, self.agent_socket, self.virtiofsd_socket, self.console_socket,
                self.debug_console_socket, self.vsock_socket, self.hybrid_vsock_socket)
