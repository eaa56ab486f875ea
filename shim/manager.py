"""The ``start`` and ``delete`` actions: what containerd runs before and after a shim daemon.

Theory of operation
-------------------
``start`` (cwd = the container's bundle, stdin = the runtime options Any):

1. resolve configuration.toml (runtime options' ``config_path``, or ``config_body`` written
   to the bundle, then ``$KATA_CONF_FILE`` and the default paths) and load it, so a broken
   configuration fails the task with a readable message; record the resolved path in
   ``<bundle>/kata-config-path`` for ``delete``;
2. group id = annotation ``io.kubernetes.cri.sandbox-id``, else ``io.containerd.runc.v2.group``,
   else the container id; one daemon (one VM) serves a group;
3. address = ``unix:///run/containerd/s/<sha256("<address>/<ns>/<group>")>``. If a daemon
   answers there, this container joins it. Otherwise bind and listen here (socket 0600,
   directory 0711), re-execute this program detached as the daemon with the listener on fd 3
   and /dev/null as stdio (containerd reads our output with CombinedOutput, which would wait
   for any inherited stdout), and write ``shim.pid``;
4. write ``address`` atomically (no newline) and return the address for ``main`` to print.

``delete`` (cwd = the bundle) runs after every task deletion and after a shim crash. It
touches only its own id: the pod's sandbox (group id == id) is cleaned from its state dir with
``cleanup_after_crash`` when no daemon answers any more (a live daemon cleans up itself);
another container only has its rootfs unmounted. It returns a ``DeleteResponse`` (exit 137,
now) even when nothing was left; real failures raise and make the action exit non-zero.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from common import constants
from sandbox.config import RuntimeConfig, load_config, variant_of
from sandbox.errors import FailedPreconditionError, InvalidArgumentError
from shim.bundle import (
    CONTAINER_TYPE_ANNOTATION,
    group_id,
    read_spec,
    spec_annotations,
)
from shim.flags import Flags, daemon_argv
from shim.spawning import spawn_with_fds
from ttrpc import wire
from ttrpc.frames import HEADER, HEADER_SIZE, MessageType, encode_frame

log = logging.getLogger("shim")

SOCKET_DIR = Path("/run/containerd/s")
CONFIG_PATH_FILE = "kata-config-path"
CONFIG_BODY_FILE = "kata-configuration.toml"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"
DEFAULT_STATE_DIR = Path(constants.DEFAULT_STATE_DIR)  # for configurations that fail to load
MAX_SOCKET_PATH = 106
DAEMON_READY_TIMEOUT = 30.0  # the daemon's Python start-up, on a loaded host
TASK_SERVICE = "containerd.task.v2.Task"


def socket_path(address: str, namespace: str, group: str, socket_dir: Path = SOCKET_DIR) -> Path:
    """Where the daemon of ``group`` listens (runc's hashing, so paths stay short)."""
    digest = hashlib.sha256(f"{address}/{namespace}/{group}".encode()).hexdigest()
    return socket_dir / digest


def socket_address(path: Path) -> str:
    """The address containerd dials for a socket path."""
    return f"unix://{path}"


def is_listening(path: Path, timeout: float = 1.0) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def config_path_from_options(options: bytes, bundle: Path) -> str:
    """The configuration.toml named by the runtime options Any ('' when none)."""
    if not options:
        return ""
    # Imported only here: containerd sends options only when a runtime is configured with
    # them, and protobuf is most of what `start` would otherwise import (ttrpc/wire.py).
    from google.protobuf import any_pb2

    from protocols import runtimeoptions_pb2

    envelope = any_pb2.Any()
    try:
        envelope.ParseFromString(options)
    except Exception as e:
        raise InvalidArgumentError(f"failed to parse the runtime options: {e}") from e
    if not envelope.type_url.endswith(RUNTIME_OPTIONS_TYPE):
        log.debug("ignoring runtime options of type %s", envelope.type_url)
        return ""
    opts = runtimeoptions_pb2.Options.FromString(envelope.value)
    if opts.config_path:
        return opts.config_path
    if opts.config_body:
        body = bundle / CONFIG_BODY_FILE
        body.write_bytes(opts.config_body)
        return str(body)
    return ""


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (no newline added) in one rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


BINARY_NAME = "containerd-shim-kata-v2"


def _is_shim_name(name: str) -> bool:
    return name == BINARY_NAME or bool(variant_of(name))


def _frozen_self_path() -> str | None:
    """The path the frozen program was run by, when it names the shim (a symlink to the
    bundle's executable, build/runtime-entry.py); None otherwise."""
    invoked = sys.argv[0] if sys.argv else ""
    if "/" in invoked:  # containerd runs shims by their full path
        path: str | None = os.path.abspath(invoked)
    else:
        import shutil  # only for a bare name: `start` and `delete` keep their imports small

        path = shutil.which(invoked)
    if not path or not _is_shim_name(os.path.basename(path)):
        return None
    try:
        return path if os.path.samefile(path, sys.executable) else None
    except OSError:
        return None


def self_command() -> list[str]:
    """How to execute this program again: frozen binary, launcher script, or ``-m shim``.

    The launcher is preferred so that the daemon's command line names
    containerd-shim-kata-v2, as operators (and `ps`-based tooling) expect. Frozen, one
    program answers to every shim name: it is re-executed by the path it was run by, so the
    daemon keeps its name (the variant); ``-m shim.main`` is the frozen program's fallback.
    """
    if getattr(sys, "frozen", False):
        path = _frozen_self_path()
        return [path] if path else [sys.executable, "-m", "shim.main"]
    launcher = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    ours = launcher is not None and _is_shim_name(launcher.name)
    if launcher is not None and ours and launcher.is_file():
        return [sys.executable, str(launcher)]
    return [sys.executable, "-P", "-m", "shim"]


def start(
    flags: Flags,
    options: bytes,
    *,
    socket_dir: Path = SOCKET_DIR,
    command: list[str] | None = None,
) -> str:
    """Run the ``start`` action in the bundle (cwd); return the address to print."""
    bundle = Path.cwd()
    config = load_config(config_path_from_options(options, bundle) or None,
                         variant_of(sys.argv[0] if sys.argv else ""))
    write_atomic(bundle / CONFIG_PATH_FILE, str(config.path))
    spec = read_spec(bundle)
    group = group_id(spec, flags.id)
    path = socket_path(flags.address, flags.namespace, group, socket_dir)
    if len(str(path)) >= MAX_SOCKET_PATH:
        raise InvalidArgumentError(f"failed to start shim: socket path {path} is too long")
    if not is_listening(path):
        if spec_annotations(spec).get(CONTAINER_TYPE_ANNOTATION) == "container":
            raise FailedPreconditionError(
                f"failed to start shim: the daemon of sandbox {group} is not running"
            )
        listener = _listen(path)
        try:
            pid = _spawn_daemon(command or self_command(), flags, group, config, listener)
        finally:
            listener.close()
        _wait_serving(path, pid, flags.id)
        write_atomic(bundle / "shim.pid", str(pid))
    address = socket_address(path)
    write_atomic(bundle / "address", address)
    return address


def _wait_serving(path: Path, pid: int, container_id: str,
                  timeout: float = DAEMON_READY_TIMEOUT) -> None:  # fmt: skip
    """Return once the daemon answers a ttrpc Connect on ``path``; else kill it, remove the
    socket and fail. containerd removes no socket of a shim that died before it connected,
    so `start` makes sure it hands over a daemon that serves."""
    request = wire.ttrpc_request(TASK_SERVICE, "Connect", wire.connect_request(container_id))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            conn.sendall(encode_frame(1, MessageType.REQUEST, request))
            header = _recv_exactly(conn, HEADER_SIZE)
            length, stream_id, kind, _flags = HEADER.unpack(header)
            if stream_id != 1 or kind != MessageType.RESPONSE:
                raise OSError(f"unexpected ttrpc frame (stream {stream_id}, type {kind})")
            _recv_exactly(conn, length)
    except OSError as e:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        path.unlink(missing_ok=True)
        raise FailedPreconditionError(f"failed to start shim daemon (pid {pid}): {e}") from e


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the shim daemon closed the connection (it exited)")
        data += chunk
    return bytes(data)


def _listen(path: Path) -> socket.socket:
    """Bind and listen on ``path``, replacing a stale socket (0600 in a 0711 directory)."""
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    for attempt in range(2):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE or attempt == 1 or is_listening(path):
                raise FailedPreconditionError(f"failed to bind shim socket {path}: {e}") from e
            path.unlink(missing_ok=True)  # stale: nobody accepts there
            continue
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock
    raise AssertionError("unreachable")


def _spawn_daemon(
    command: list[str], flags: Flags, group: str, config: RuntimeConfig, listener: socket.socket
) -> int:
    """Start the detached daemon with ``listener`` as fd 3; return its pid."""
    argv = [*command, *daemon_argv(flags, group, str(config.path))]
    try:
        return spawn_with_fds(argv, os.environ, {3: listener.fileno()}, setsid=True)
    except OSError as e:
        raise FailedPreconditionError(f"failed to start shim daemon {argv[0]}: {e}") from e


def _delete_config(bundle: Path) -> Path:
    """The state dir ``delete`` cleans: from the config ``start`` recorded, else the default."""
    recorded = bundle / CONFIG_PATH_FILE
    config_path = recorded.read_text().strip() if recorded.is_file() else None
    try:
        return load_config(config_path, variant_of(sys.argv[0] if sys.argv else "")).state_dir
    except InvalidArgumentError as e:
        log.warning("using state dir %s: %s", DEFAULT_STATE_DIR, e)
        return DEFAULT_STATE_DIR


def delete(flags: Flags, *, socket_dir: Path = SOCKET_DIR) -> bytes:
    """Run the ``delete`` action; return the serialized DeleteResponse to print."""
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    try:
        spec = read_spec(bundle)
    except InvalidArgumentError:
        spec = {}  # bundle already gone or never written: nothing names a group
    group = group_id(spec, flags.id)
    state_dir = _delete_config(bundle)
    # Only `delete` cleans up: `start`, which runs as often, skips this import (~20 ms of
    # CPU on the host per container, with the cgroup and mount helpers it brings).
    from sandbox.cleanup import cleanup_after_crash, exited_shim, unmount_container

    if group != flags.id:
        if is_listening(socket_path(flags.address, flags.namespace, group, socket_dir)):
            log.info("shim daemon of pod %s is alive: it owns %s's rootfs", group, flags.id)
        else:
            unmount_container(state_dir, flags.namespace, group, flags.id)
    else:
        _delete_sandbox(flags, state_dir, socket_dir, cleanup_after_crash, exited_shim)
    return delete_response(time.time_ns())


def _delete_sandbox(flags: Flags, state_dir: Path, socket_dir: Path,
                    cleanup_after_crash: Callable[[Path, str, str], bool],
                    exited_shim: Callable[[Path, str, str], int | None]) -> None:
    path = socket_path(flags.address, flags.namespace, flags.id, socket_dir)
    listening = is_listening(path)
    if listening:
        # The sandbox's record is the judge when it names the shim: right after a kill -9
        # the socket was once seen accepting while that shim had gone (how, not found).
        gone = exited_shim(state_dir, flags.namespace, flags.id)
        if gone is None:
            log.info("shim daemon still serves sandbox %s: it cleans up itself", flags.id)
            return
        log.warning("sandbox %s: its socket accepts connections but its shim (pid %d) has "
                    "exited: cleaning up", flags.id, gone)
    if cleanup_after_crash(state_dir, flags.namespace, flags.id):
        log.warning("cleaned up sandbox %s left by a dead shim daemon", flags.id)
    # containerd runs this after a shim's connection closed, when the next shim of the id
    # may already listen on the same path (`ctr rm x; ctr run x`): a socket dead when we
    # looked and serving now is that shim's.
    if listening or not is_listening(path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def delete_response(now_ns: int) -> bytes:
    """A serialized DeleteResponse: no pid, killed (137), exited now."""
    return wire.delete_response(0, constants.EXIT_STATUS_KILLED, now_ns)
