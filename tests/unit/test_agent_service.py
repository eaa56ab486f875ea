"""agent.service over a real ttrpc connection; agent.channel's serial reconnect loop."""

from __future__ import annotations

import asyncio
import pty
import tty
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import empty_pb2

from agent import channel
from agent.container import Containers, RuntimeConfig
from agent.reaper import Reaper
from agent.service import SERVICE, AgentService, StartupInfo
from agent.storage import StorageRequest, Storages
from protocols import agent_pb2 as pb
from protocols import ttrpc_pb2
from ttrpc import Client, Code, Server, TtrpcError


def _service(tmp_path: Path, mounts: list[tuple[str, ...]]) -> AgentService:
    containers = Containers(RuntimeConfig(run_dir=str(tmp_path), cgroup_parent=""), Reaper())
    storages = Storages(str(tmp_path), mount=lambda *a: mounts.append(tuple(map(str, a))),
                        umount=lambda t, f: mounts.append(("umount", t)))
    return AgentService(containers, storages, StartupInfo(1.5, 3.0), set_hostname=False)


async def _serial_pair(service: AgentService) -> tuple[Client, list[int], Any]:
    """Serve on fake "serial ports": raw pty pairs (char devices, like /dev/vportNpM);
    each reopen by the agent hands out a new pair, the host side keeps the master."""
    server = Server()
    server.register(SERVICE, service.methods())
    hosts: list[int] = []

    def opener(_path: str) -> int:
        master, slave = pty.openpty()
        tty.setraw(slave)
        tty.setraw(master)
        hosts.append(master)
        return slave

    task = asyncio.ensure_future(channel.serve_serial(server.serve_connection, "/dev/vport0p1",
                                                      lambda where: None, opener=opener))
    while not hosts:
        await asyncio.sleep(0.005)
    return Client(*await channel.open_fd_streams(hosts[-1])), hosts, task


def test_handlers_and_error_codes(tmp_path: Path) -> None:
    mounts: list[tuple[str, ...]] = []

    async def main() -> None:
        client, hosts, task = await _serial_pair(_service(tmp_path, mounts))

        async def code(method: str, req: Any) -> Code:
            with pytest.raises(TtrpcError) as err:
                await client.call(SERVICE, method, req, empty_pb2.Empty, timeout=5)
            return err.value.code

        details = await client.call(SERVICE, "GetGuestDetails", pb.GuestDetailsRequest(),
                                    pb.GuestDetailsResponse, timeout=5)
        assert (details.agent_init_seconds, details.agent_startup_seconds) == (1.5, 3.0)
        assert await code("StartContainer", pb.StartContainerRequest(container_id="x")) \
            == Code.NOT_FOUND
        assert await code("WaitProcess", pb.WaitProcessRequest(container_id="a/b")) \
            == Code.INVALID_ARGUMENT
        assert await code("CreateContainer", pb.CreateContainerRequest(
            container_id="c1", oci_spec_json=b"not json")) == Code.INVALID_ARGUMENT
        assert await code("CreateSandbox", pb.CreateSandboxRequest(hostname="bad host")) \
            == Code.INVALID_ARGUMENT
        st = pb.Storage(driver="virtio-fs", source="kataShared",
                        mount_point=f"{tmp_path}/shared")
        await client.call(SERVICE, "CreateSandbox", pb.CreateSandboxRequest(
            hostname="pod_1", storages=[st]), empty_pb2.Empty, timeout=5)  # runc takes "_"
        assert mounts == [("kataShared", f"{tmp_path}/shared", "virtiofs", "0", "")]
        escape = pb.Storage(driver="virtio-fs", source="t", mount_point="/etc")
        assert await code("CreateSandbox", pb.CreateSandboxRequest(storages=[escape])) \
            == Code.INVALID_ARGUMENT
        await client.call(SERVICE, "DestroySandbox", pb.DestroySandboxRequest(),
                          empty_pb2.Empty, timeout=5)
        assert mounts[-1] == ("umount", f"{tmp_path}/shared")

        # The host disconnects; the agent reopens the port and serves the next host.
        await client.close()
        while len(hosts) < 2:
            await asyncio.sleep(0.01)
        client2 = Client(*await channel.open_fd_streams(hosts[-1]))
        check = await client2.call(SERVICE, "Check", pb.CheckRequest(),
                                   pb.HealthCheckResponse, timeout=5)
        assert check.status == pb.HealthCheckResponse.SERVING
        await client2.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_storage_rejects_unknown_driver(tmp_path: Path) -> None:
    storages = Storages(str(tmp_path), mount=lambda *a: None, umount=lambda t, f: None)
    from agent.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        asyncio.run(storages.add(StorageRequest("nfs", "x", "", (), f"{tmp_path}/m")))
    with pytest.raises(InvalidArgument):
        asyncio.run(storages.add(StorageRequest("virtio-fs", "x", "ext4", (), f"{tmp_path}/m")))


def test_vsock_needs_a_virtio_vsock_device(tmp_path: Path) -> None:
    from agent.channel import has_virtio_vsock

    console = tmp_path / "virtio0"
    console.mkdir()
    (console / "device").write_text("0x0003\n")
    assert not has_virtio_vsock(str(tmp_path))
    vsock = tmp_path / "virtio1"
    vsock.mkdir()
    (vsock / "device").write_text("0x0013\n")
    assert has_virtio_vsock(str(tmp_path))
    assert not has_virtio_vsock(str(tmp_path / "missing"))


@pytest.mark.parametrize("in_vm", [True, False])
def test_destroy_sandbox_keeps_crun_state_only_in_a_vm(tmp_path: Path, in_vm: bool) -> None:
    """In a VM the VM stops after DestroySandbox, so crun's state is left to it; a host-mode
    agent (tests) cleans up with `crun delete` as for RemoveContainer."""
    seen: list[bool] = []

    class Recording(Containers):
        async def remove_all(self, keep_state: bool = False) -> None:
            seen.append(keep_state)

    containers = Recording(RuntimeConfig(run_dir=str(tmp_path), cgroup_parent=""), Reaper())
    service = AgentService(containers, Storages(str(tmp_path)), StartupInfo(), False,
                           vm_ends_with_sandbox=in_vm)
    asyncio.run(service.destroy_sandbox(pb.DestroySandboxRequest()))
    assert seen == [in_vm]


@pytest.mark.parametrize("data", [b"", b"x", b"y" * 300, bytes(range(256)) * 4096])
def test_stream_reads_answer_with_what_protobuf_would_write(data: bytes) -> None:
    from agent.service import read_stream_response

    encoded = read_stream_response(data)
    assert encoded == pb.ReadStreamResponse(data=data).SerializeToString()
    assert pb.ReadStreamResponse.FromString(encoded).data == data


@pytest.mark.parametrize("size", [1, 127, 128, 300, 1 << 20])
def test_stream_reads_from_a_pipe_answer_with_protobuf_s_bytes_once_spliced(size: int) -> None:
    """A PipePayload gets ReadStreamResponse's tag and length as its head; with its bulk
    after it, and ttrpc's Response prefix before it, the bytes are protobuf's."""
    from agent.service import read_stream_response
    from ttrpc import wire
    from ttrpc.pipepayload import PipePayload

    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    answer = read_stream_response(PipePayload(-1, size, lambda: None))
    assert isinstance(answer, PipePayload)
    assert answer.head + data == pb.ReadStreamResponse(data=data).SerializeToString()
    inner = answer.head + data
    framed = wire.field_prefix(wire.RESPONSE_PAYLOAD, len(answer)) + inner
    assert framed == ttrpc_pb2.Response(payload=inner).SerializeToString()


def test_output_pipes_hold_what_the_host_asks_for_at_once() -> None:
    import fcntl

    from agent.process import OUTPUT_PIPE_BYTES, StdioSetup
    from agent_client.client import READ_CHUNK

    assert OUTPUT_PIPE_BYTES == READ_CHUNK
    setup = StdioSetup(terminal=False, stdin=True, console_path="")
    try:
        stdin_w, stdout_r, stderr_r = setup._pipes
        assert fcntl.fcntl(stdout_r, fcntl.F_GETPIPE_SZ) == OUTPUT_PIPE_BYTES
        assert fcntl.fcntl(stderr_r, fcntl.F_GETPIPE_SZ) == OUTPUT_PIPE_BYTES
        assert fcntl.fcntl(stdin_w, fcntl.F_GETPIPE_SZ) < OUTPUT_PIPE_BYTES
    finally:
        setup.abort()
