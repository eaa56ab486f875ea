"""The agent on the HOST (non-PID-1 mode, unix socket) driving real crun containers.

The agent runs as a child subreaper in a private mount namespace that has cgroup2 mounted
on /sys/fs/cgroup: crun 1.8 refuses the host's cgroup v1 hybrid layout, and this way the
agent's cgroup code (ListProcesses, kill all) runs as it does in the guest. The namespace
dies with the agent, so no mount is left behind; the test cgroup parent is removed at the
end. Containers use a busybox-static rootfs built in a temp dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protocols import agent_pb2 as pb
from tests.harness.images import busybox_rootfs
from ttrpc import Client, Code, TtrpcError

pytestmark = pytest.mark.e2e

SERVICE = "kata.agent.v1.AgentService"
CRUN = "/usr/bin/crun"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "sleep", "uname", "id", "stty", "true", "false", "ls", "ps")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    socket: str
    run_dir: Path
    crun_root: Path
    rootfs: Path
    spec_template: dict[str, Any]


def _spec_template(workdir: Path) -> dict[str, Any]:
    subprocess.run([CRUN, "spec"], cwd=workdir, check=True)
    spec: dict[str, Any] = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").unlink()
    spec["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
    spec["process"].pop("rlimits", None)  # the host (itself a container) may forbid raising them
    # The devices cgroup on cgroup2 is an eBPF program; loading it makes crun raise
    # RLIMIT_MEMLOCK, which this host forbids (no CAP_SYS_RESOURCE). The guest has no such limit.
    spec["linux"].pop("resources", None)
    return spec


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    assert os.path.exists(CRUN), f"{CRUN} missing: apt-get install crun"
    assert os.path.exists(BUSYBOX), f"{BUSYBOX} missing: apt-get install busybox-static"
    assert os.geteuid() == 0, "the agent e2e test needs root (crun, mount namespaces)"
    top = Path(tempfile.mkdtemp(prefix="ka-"))  # short: unix socket paths are limited
    run_dir, crun_root = top / "run", top / "crun"
    rootfs = run_dir / "shared" / "rootfs"
    busybox_rootfs(rootfs, APPLETS)
    cgroup_parent = f"/kata-test-{uuid.uuid4().hex[:8]}"
    sock = str(top / "agent.sock")
    cmd = (
        "mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" -m agent "
        f"--listen unix:{sock} --run-dir {run_dir} --crun-root {crun_root} "
        f"--cgroup-parent {cgroup_parent}"
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd, sys.executable],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        _wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 10.0)
        assert proc.poll() is None, "agent exited at start-up"
        yield Agent(proc, sock, run_dir, crun_root, rootfs, _spec_template(top))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            # crun created the cgroups in the (shared) cgroup2 hierarchy, not in the namespace.
            leftovers = [p.name for p in run_dir.iterdir() if p.name not in ("shared", ".console")]
            shutil.rmtree(top)
            leftover_cgroups = _remove_cgroup_tree(cgroup_parent)
    assert proc.returncode == 0
    assert leftovers == []
    assert leftover_cgroups == []


def _remove_cgroup_tree(cgroup_parent: str) -> list[str]:
    """rmdir the test's cgroups bottom-up; returns the container cgroups that were left."""
    left: list[str] = []
    for base in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        parent = Path(base + cgroup_parent)
        if not parent.is_dir():
            continue
        for dirpath, _dirs, _files in sorted(os.walk(parent), reverse=True):
            if Path(dirpath) != parent:
                left.append(dirpath)
            Path(dirpath).rmdir()
    return left


def _wait_for(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def spec_for(agent: Agent, args: list[str], terminal: bool = False) -> bytes:
    spec = json.loads(json.dumps(agent.spec_template))
    spec["root"] = {"path": str(agent.rootfs), "readonly": False}
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    return json.dumps(spec).encode()


async def call(client: Client, method: str, request: Any, response: type[Any]) -> Any:
    return await client.call(SERVICE, method, request, response, timeout=30)


async def read_all(client: Client, method: str, cid: str, eid: str = "") -> bytes:
    out = b""
    while True:
        resp = await call(client, method, pb.ReadStreamRequest(container_id=cid, exec_id=eid,
                                                               len=4096), pb.ReadStreamResponse)
        if not resp.data:
            return out
        out += resp.data


async def create_start(client: Client, agent: Agent, cid: str, args: list[str],
                       stdin: bool = False, terminal: bool = False) -> int:
    from google.protobuf import empty_pb2

    await call(client, "CreateContainer", pb.CreateContainerRequest(
        container_id=cid, oci_spec_json=spec_for(agent, args, terminal), stdin=stdin,
        terminal=terminal), empty_pb2.Empty)
    resp = await call(client, "StartContainer", pb.StartContainerRequest(container_id=cid),
                      pb.StartContainerResponse)
    assert resp.pid > 0
    return int(resp.pid)


async def wait(client: Client, cid: str, eid: str = "") -> int:
    resp = await call(client, "WaitProcess", pb.WaitProcessRequest(container_id=cid, exec_id=eid),
                      pb.WaitProcessResponse)
    return int(resp.status)


async def remove(client: Client, agent: Agent, cid: str) -> None:
    from google.protobuf import empty_pb2

    await call(client, "RemoveContainer", pb.RemoveContainerRequest(container_id=cid),
               empty_pb2.Empty)
    assert not (agent.run_dir / cid).exists()
    assert not (agent.crun_root / cid).exists()


def run(agent: Agent, scenario: Any) -> None:
    async def main() -> None:
        client = await Client.connect_unix(agent.socket)
        try:
            await scenario(client)
        finally:
            await client.close()

    asyncio.run(main())


def test_echo_stdout_stderr_exit_code(agent: Agent) -> None:
    async def scenario(client: Client) -> None:
        await create_start(client, agent, "echo1", ["sh", "-c", "echo hello; echo err >&2; exit 3"])
        assert await read_all(client, "ReadStdout", "echo1") == b"hello\n"
        assert await read_all(client, "ReadStderr", "echo1") == b"err\n"
        assert await wait(client, "echo1") == 3
        await remove(client, agent, "echo1")

    run(agent, scenario)


def test_stdin_round_trip(agent: Agent) -> None:
    from google.protobuf import empty_pb2

    async def scenario(client: Client) -> None:
        await create_start(client, agent, "cat1", ["cat"], stdin=True)
        resp = await call(client, "WriteStdin", pb.WriteStreamRequest(
            container_id="cat1", data=b"ping\n" * 1000), pb.WriteStreamResponse)
        assert resp.len == 5000
        await call(client, "CloseStdin", pb.CloseStdinRequest(container_id="cat1"),
                   empty_pb2.Empty)
        assert await read_all(client, "ReadStdout", "cat1") == b"ping\n" * 1000
        assert await wait(client, "cat1") == 0
        await remove(client, agent, "cat1")

    run(agent, scenario)


def test_exec_list_and_kill(agent: Agent) -> None:
    from google.protobuf import empty_pb2

    async def scenario(client: Client) -> None:
        pid = await create_start(client, agent, "sleep1", ["sleep", "1000"])
        process = {"args": ["sh", "-c", "echo in-exec; exit 7"], "cwd": "/",
                   "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
        resp = await call(client, "ExecProcess", pb.ExecProcessRequest(
            container_id="sleep1", exec_id="e1", process_json=json.dumps(process).encode()),
            pb.ExecProcessResponse)
        assert resp.pid > 0
        assert await read_all(client, "ReadStdout", "sleep1", "e1") == b"in-exec\n"
        assert await wait(client, "sleep1", "e1") == 7
        pids = await call(client, "ListProcesses", pb.ListProcessesRequest(container_id="sleep1"),
                          pb.ListProcessesResponse)
        assert list(pids.pids) == [pid]
        await call(client, "SignalProcess", pb.SignalProcessRequest(
            container_id="sleep1", signal=signal.SIGKILL), empty_pb2.Empty)
        assert await wait(client, "sleep1") == 137
        await remove(client, agent, "sleep1")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    run(agent, scenario)


def test_terminal_resize(agent: Agent) -> None:
    from google.protobuf import empty_pb2

    async def scenario(client: Client) -> None:
        await create_start(client, agent, "tty1", ["sh", "-c", "read x; stty size"],
                           stdin=True, terminal=True)
        await call(client, "TtyWinResize", pb.TtyWinResizeRequest(
            container_id="tty1", row=33, column=101), empty_pb2.Empty)
        await call(client, "WriteStdin", pb.WriteStreamRequest(container_id="tty1", data=b"go\n"),
                   pb.WriteStreamResponse)
        out = await read_all(client, "ReadStdout", "tty1")
        assert b"33 101" in out
        assert await read_all(client, "ReadStderr", "tty1") == b""
        assert await wait(client, "tty1") == 0
        await remove(client, agent, "tty1")

    run(agent, scenario)


def test_command_not_found_leaves_nothing(agent: Agent) -> None:
    from google.protobuf import empty_pb2

    async def scenario(client: Client) -> None:
        request = pb.CreateContainerRequest(container_id="nf1",
                                            oci_spec_json=spec_for(agent, ["/no/such"]))
        with pytest.raises(TtrpcError) as err:
            await call(client, "CreateContainer", request, empty_pb2.Empty)
        assert err.value.code == Code.INVALID_ARGUMENT
        assert "/no/such" in err.value.message and "not found" in err.value.message
        assert not (agent.run_dir / "nf1").exists()
        assert not (agent.crun_root / "nf1").exists()
        with pytest.raises(TtrpcError) as err:
            await call(client, "WaitProcess", pb.WaitProcessRequest(container_id="nf1"),
                       pb.WaitProcessResponse)
        assert err.value.code == Code.NOT_FOUND

    run(agent, scenario)


def test_an_exec_of_a_missing_program_fails_and_frees_its_id(agent: Agent) -> None:
    from google.protobuf import empty_pb2

    async def scenario(client: Client) -> None:
        await create_start(client, agent, "nf2", ["sleep", "1000"])
        process = {"args": ["/no/such"], "cwd": "/", "env": ["PATH=/bin"],
                   "user": {"uid": 0, "gid": 0}}
        request = pb.ExecProcessRequest(container_id="nf2", exec_id="e1", stdin=True,
                                        process_json=json.dumps(process).encode())
        with pytest.raises(TtrpcError) as err:
            await asyncio.wait_for(call(client, "ExecProcess", request, pb.ExecProcessResponse),
                                   60)
        assert "/no/such" in err.value.message and "not found" in err.value.message
        with pytest.raises(TtrpcError) as err:  # the failed exec left no process behind
            await call(client, "WaitProcess", pb.WaitProcessRequest(
                container_id="nf2", exec_id="e1"), pb.WaitProcessResponse)
        assert err.value.code == Code.NOT_FOUND
        await call(client, "SignalProcess", pb.SignalProcessRequest(
            container_id="nf2", signal=signal.SIGKILL), empty_pb2.Empty)
        assert await wait(client, "nf2") == 137
        await remove(client, agent, "nf2")

    run(agent, scenario)


def test_errors_and_details(agent: Agent) -> None:
    from google.protobuf import empty_pb2

    async def scenario(client: Client) -> None:
        async def code_of(method: str, request: Any) -> Code:
            with pytest.raises(TtrpcError) as err:
                await call(client, method, request, empty_pb2.Empty)
            return err.value.code

        assert await code_of("StartContainer", pb.StartContainerRequest(
            container_id="nope")) == Code.NOT_FOUND
        assert await code_of("StartContainer", pb.StartContainerRequest(
            container_id="../x")) == Code.INVALID_ARGUMENT
        await create_start(client, agent, "dup1", ["sleep", "1000"])
        assert await code_of("CreateContainer", pb.CreateContainerRequest(
            container_id="dup1", oci_spec_json=spec_for(agent, ["true"]))) == Code.ALREADY_EXISTS
        assert await code_of("StartContainer", pb.StartContainerRequest(
            container_id="dup1")) == Code.FAILED_PRECONDITION
        assert await code_of("CloseStdin", pb.CloseStdinRequest(
            container_id="dup1", exec_id="nope")) == Code.NOT_FOUND
        await remove(client, agent, "dup1")
        details = await call(client, "GetGuestDetails", pb.GuestDetailsRequest(),
                             pb.GuestDetailsResponse)
        assert details.kernel_release == os.uname().release
        assert details.agent_init_seconds > 0 and details.agent_startup_seconds > 0
        check = await call(client, "Check", pb.CheckRequest(), pb.HealthCheckResponse)
        assert check.status == pb.HealthCheckResponse.SERVING

    run(agent, scenario)
