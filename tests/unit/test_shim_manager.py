"""`start` and `delete`: grouping, socket address, spawning the daemon, idempotent cleanup."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocols import runtimeoptions_pb2, task_pb2
from sandbox.errors import FailedPreconditionError
from shim import bundle as B
from shim import manager
from shim.flags import parse
from tests.unit.fakes import write_bundle, write_config

# A stand-in daemon: records its argv/env/cwd, then answers one ttrpc request per
# connection on fd 3 with an empty Response (what `start` waits for), and drops it.
FAKE_DAEMON = """
import json, os, socket, struct, sys
s = socket.socket(fileno=3)
json.dump({"argv": sys.argv, "cwd": os.getcwd(), "ttrpc": os.environ.get("TTRPC_ADDRESS"),
           "stdout": os.readlink("/proc/self/fd/1")}, open("daemon.json", "w"))
while True:
    c, _ = s.accept()
    head = c.recv(10)
    if len(head) == 10:
        length, stream, _type, _flags = struct.unpack(">IIBB", head)
        while length > 0:
            length -= len(c.recv(length))
        c.sendall(struct.pack(">IIBB", 0, stream, 2, 0))
    c.close()
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    sockets = Path(tempfile.mkdtemp(prefix="s", dir="/tmp")) / "s"  # socket paths stay short
    state = tmp_path / "state"
    config = write_config(tmp_path / "configuration.toml", state)
    monkeypatch.setenv("KATA_CONF_FILE", str(config))
    monkeypatch.setenv("TTRPC_ADDRESS", "/run/containerd/containerd.sock.ttrpc")
    yield {"tmp": tmp_path, "sockets": sockets, "state": state, "config": config}
    for pid_file in tmp_path.rglob("shim.pid"):
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    shutil.rmtree(sockets.parent)


def flags_for(cid: str, action: str = "start") -> list[str]:
    return ["-namespace", "default", "-address", "/run/containerd/containerd.sock",
            "-publish-binary", "/usr/bin/containerd", "-id", cid, action]  # fmt: skip


def run_start(bundle: Path, cid: str, sockets: Path, options: bytes = b"",
              command: list[str] | None = None) -> str:  # fmt: skip
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        cmd = command if command is not None else [sys.executable, "-c", FAKE_DAEMON]
        return manager.start(parse(flags_for(cid)), options, socket_dir=sockets, command=cmd)
    finally:
        os.chdir(cwd)


def test_address_is_runc_hashing() -> None:
    path = manager.socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert path == Path("/run/containerd/s") / digest
    assert manager.socket_address(path) == f"unix:///run/containerd/s/{digest}"
    assert len(str(path)) < manager.MAX_SOCKET_PATH


def test_group_id_precedence() -> None:
    both = {"annotations": {B.SANDBOX_ID_ANNOTATION: "pod", B.GROUP_ANNOTATION: "g"}}
    assert B.group_id(both, "c") == "pod"
    assert B.group_id({"annotations": {B.GROUP_ANNOTATION: "g"}}, "c") == "g"
    assert B.group_id({}, "c") == "c"


def test_start_spawns_a_listening_daemon(env: dict[str, Path]) -> None:
    bundle = write_bundle(env["tmp"] / "b1")
    address = run_start(bundle, "c1", env["sockets"])
    path = manager.socket_path("/run/containerd/containerd.sock", "default", "c1", env["sockets"])
    assert address == f"unix://{path}"
    assert (bundle / "address").read_text() == address  # no trailing newline
    assert manager.is_listening(path)  # listening before start returned
    assert path.stat().st_mode & 0o777 == 0o600
    assert env["sockets"].stat().st_mode & 0o777 == 0o711
    assert (bundle / manager.CONFIG_PATH_FILE).read_text() == str(env["config"])
    pid = int((bundle / "shim.pid").read_text())
    assert os.getsid(pid) == pid  # its own session
    record = _wait_json(bundle / "daemon.json")
    argv = record["argv"]
    assert argv[argv.index("-sandbox-id") + 1] == "c1" and "-daemon" in argv
    assert argv[argv.index("-config-path") + 1] == str(env["config"])
    assert record["cwd"] == str(bundle)
    assert record["ttrpc"] == "/run/containerd/containerd.sock.ttrpc"
    assert record["stdout"] == "/dev/null"


def _wait_json(path: Path) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_second_start_of_the_pod_joins_the_live_daemon(env: dict[str, Path]) -> None:
    pod = {B.SANDBOX_ID_ANNOTATION: "pod1"}
    sandbox = write_bundle(env["tmp"] / "pod1", pod)
    first = run_start(sandbox, "pod1", env["sockets"])
    container = write_bundle(env["tmp"] / "c2", {**pod, B.CONTAINER_TYPE_ANNOTATION:
                                                  "container"})  # fmt: skip
    second = run_start(container, "c2", env["sockets"], command=["/nonexistent"])
    assert second == first
    assert (container / "address").read_text() == first
    assert not (container / "shim.pid").exists()


def test_stale_socket_is_replaced(env: dict[str, Path]) -> None:
    path = manager.socket_path("/run/containerd/containerd.sock", "default", "c1", env["sockets"])
    env["sockets"].mkdir(mode=0o711)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound but nobody listens
    run_start(write_bundle(env["tmp"] / "b1"), "c1", env["sockets"])
    assert manager.is_listening(path)


def test_container_of_a_dead_pod_is_refused(env: dict[str, Path]) -> None:
    notes = {B.SANDBOX_ID_ANNOTATION: "gone", B.CONTAINER_TYPE_ANNOTATION: "container"}
    with pytest.raises(FailedPreconditionError, match="daemon of sandbox gone is not running"):
        run_start(write_bundle(env["tmp"] / "c9", notes), "c9", env["sockets"])


def test_runtime_options_choose_the_configuration(env: dict[str, Path]) -> None:
    other = write_config(env["tmp"] / "other.toml", env["tmp"] / "state2")
    opts = runtimeoptions_pb2.Options(config_path=str(other))
    envelope = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
    bundle = write_bundle(env["tmp"] / "b1")
    run_start(bundle, "c1", env["sockets"], envelope.SerializeToString())
    assert (bundle / manager.CONFIG_PATH_FILE).read_text() == str(other)


def test_runc_options_are_ignored(tmp_path: Path) -> None:
    envelope = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x08\x01")
    assert manager.config_path_from_options(envelope.SerializeToString(), tmp_path) == ""
    assert manager.config_path_from_options(b"", tmp_path) == ""


def run_delete(bundle: Path, cid: str, sockets: Path) -> task_pb2.DeleteResponse:
    cwd = os.getcwd()
    os.chdir(bundle)
    try:
        raw = manager.delete(parse(flags_for(cid, "delete")), socket_dir=sockets)
    finally:
        os.chdir(cwd)
    return task_pb2.DeleteResponse.FromString(raw)


def test_delete_is_idempotent_and_reports_137(env: dict[str, Path]) -> None:
    bundle = write_bundle(env["tmp"] / "b1")
    for _ in range(2):
        response = run_delete(bundle, "c1", env["sockets"])
        assert (response.pid, response.exit_status) == (0, 137)
        assert abs(response.exited_at.seconds - time.time()) < 5


def test_delete_cleans_a_crashed_sandbox_only(env: dict[str, Path]) -> None:
    bundle = write_bundle(env["tmp"] / "pod1")
    (bundle / manager.CONFIG_PATH_FILE).write_text(str(env["config"]))
    mine = env["state"] / "sbs" / "pod1"
    theirs = env["state"] / "sbs" / "pod2"
    (mine / "shared").mkdir(parents=True)
    theirs.mkdir(parents=True)
    run_delete(bundle, "pod1", env["sockets"])
    assert not mine.exists() and theirs.exists()


def test_delete_leaves_a_live_daemon_alone(env: dict[str, Path]) -> None:
    bundle = write_bundle(env["tmp"] / "pod1")
    run_start(bundle, "pod1", env["sockets"])
    (env["state"] / "sbs" / "pod1").mkdir(parents=True)
    run_delete(bundle, "pod1", env["sockets"])
    assert (env["state"] / "sbs" / "pod1").exists()


def test_delete_cleans_up_when_the_socket_accepts_but_the_recorded_shim_exited(
        env: dict[str, Path]) -> None:
    """Seen once after a kill -9 of the daemon: its socket still accepted a connection."""
    from hostos.procs import start_time
    from sandbox.state import SandboxRecord, write_record

    bundle = write_bundle(env["tmp"] / "pod1")
    (bundle / manager.CONFIG_PATH_FILE).write_text(str(env["config"]))
    path = manager.socket_path("/run/containerd/containerd.sock", "default", "pod1",
                               env["sockets"])
    env["sockets"].mkdir(mode=0o711)
    sandbox = env["state"] / "sbs" / "pod1"
    sandbox.mkdir(parents=True)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                            capture_output=True, text=True, check=True)
    with socket.socket(socket.AF_UNIX) as holder:  # accepts, as the socket did
        holder.bind(str(path))
        holder.listen(1)
        # A live shim (this process) is left alone, listening socket or not ...
        write_record(sandbox, SandboxRecord("pod1", shim_pid=os.getpid(),
                                            shim_start_time=start_time(os.getpid()) or 0))
        run_delete(bundle, "pod1", env["sockets"])
        assert sandbox.exists()
        # ... one that has exited is not.
        write_record(sandbox, SandboxRecord("pod1", shim_pid=int(exited.stdout),
                                            shim_start_time=1))
        run_delete(bundle, "pod1", env["sockets"])
        assert not sandbox.exists() and not path.exists()


def test_delete_keeps_the_socket_of_the_next_shim_of_the_id(env: dict[str, Path]) -> None:
    """containerd deletes a shim whose connection closed while the next shim of the id may
    already listen on the same path (`ctr rm x; ctr run x`): its socket stays."""
    path = manager.socket_path("/run/containerd/containerd.sock", "default", "pod1",
                               env["sockets"])
    env["sockets"].mkdir(mode=0o711)
    flags = parse(flags_for("pod1", "delete"))
    with socket.socket(socket.AF_UNIX) as next_shim:
        def cleanup(state_dir: Path, namespace: str, sandbox_id: str) -> bool:
            next_shim.bind(str(path))  # the next shim starts meanwhile
            next_shim.listen(1)
            return False

        manager._delete_sandbox(flags, env["state"], env["sockets"], cleanup,
                                lambda *_: None)
        assert manager.is_listening(path)
    # A socket nobody serves is removed.
    manager._delete_sandbox(flags, env["state"], env["sockets"], lambda *_: False,
                            lambda *_: None)
    assert not path.exists()


def test_delete_of_a_pod_container_unmounts_only_its_rootfs(env: dict[str, Path]) -> None:
    bundle = write_bundle(env["tmp"] / "c2", {B.SANDBOX_ID_ANNOTATION: "pod1"})
    containers = env["state"] / "sbs" / "pod1" / "shared" / "containers"
    (containers / "c2" / "rootfs").mkdir(parents=True)
    (containers / "c3").mkdir()
    run_delete(bundle, "c2", env["sockets"])
    assert not (containers / "c2").exists() and (containers / "c3").exists()


def test_delete_of_a_pod_container_leaves_a_live_pod_daemon_alone(env: dict[str, Path]) -> None:
    pod = write_bundle(env["tmp"] / "pod1")
    run_start(pod, "pod1", env["sockets"])  # the pod's daemon listens
    bundle = write_bundle(env["tmp"] / "c2", {B.SANDBOX_ID_ANNOTATION: "pod1"})
    rootfs = env["state"] / "sbs" / "pod1" / "shared" / "containers" / "c2" / "rootfs"
    rootfs.mkdir(parents=True)
    run_delete(bundle, "c2", env["sockets"])
    assert rootfs.exists(), "the live daemon owns c2's rootfs; delete must not touch it"


LIGHT_PATH = """
import sys
import shim.main, shim.manager
from sandbox.config import load_config
load_config(sys.argv[1])
from sandbox.cleanup import cleanup_after_crash
print(" ".join(sorted(sys.modules)))
"""


def test_start_and_delete_load_no_vm_agent_or_event_loop_code() -> None:
    """containerd runs `start` and `delete` for every container: their imports stay small
    (measured: ~90 ms with these left out, as before the hypervisor seam)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", LIGHT_PATH, str(repo / "configuration.toml")],
                          cwd=repo, capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    heavy = {"asyncio", "hypervisors.base", "hypervisors.qemu.vm", "hypervisors.qmp",
             "agent_client", "sandbox.sandbox", "sandbox.pod", "shutil"}
    assert not loaded & heavy, loaded & heavy


START_PATH = """
import os, socket, sys
import shim.main, shim.manager
from sandbox.config import load_config
from shim.flags import parse
config = load_config(sys.argv[1])
flags = parse(["-namespace", "n", "-address", "/a", "-publish-binary", "/b", "-id", "x",
               "start"])
with socket.socket(socket.AF_UNIX) as listener:  # what start does, with /bin/true as daemon
    os.waitpid(shim.manager._spawn_daemon(["/bin/true"], flags, "x", config, listener), 0)
print(" ".join(sorted(sys.modules)))
"""


def test_start_leaves_the_cleanup_code_to_delete_and_asyncio_to_the_daemon() -> None:
    """`start` never cleans up: the cleanup stack (cgroups, mounts, process records) is
    imported by `delete` alone. Nor does it run an event loop: it spawns the daemon with a
    plain posix_spawn (asyncio is ~20 ms of every container's start on the host)."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", START_PATH, str(repo / "configuration.toml")],
                          cwd=repo, capture_output=True, text=True, check=True)
    unwanted = {"sandbox.cleanup", "hostos.cgroups", "asyncio"}
    assert not set(done.stdout.split()) & unwanted, set(done.stdout.split()) & unwanted


def test_a_daemon_that_dies_before_serving_leaves_no_socket(env: dict[str, Path]) -> None:
    """containerd removes no socket of a shim that died before it connected: `start`
    itself must make sure it hands over a daemon that serves."""
    bundle = write_bundle(env["tmp"] / "t1")
    with pytest.raises(FailedPreconditionError, match="failed to start shim daemon"):
        run_start(bundle, "t1", env["sockets"], command=[sys.executable, "-c", "exit(3)"])
    assert not env["sockets"].exists() or list(env["sockets"].iterdir()) == []
    assert not (bundle / "address").exists()
