"""Typed host-side calls of the agent API (``kata.agent.v1.AgentService``) over ttrpc.

Every call has a deadline from ``TIMEOUTS``; the long polls (WaitProcess, ReadStdout,
ReadStderr) say ``None`` explicitly: they last as long as the process does. Protobuf types
stop here: callers pass and get plain Python values.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from agent_client.dial import open_stream
from agent_client.errors import AgentCallError
from agent_client.types import (
    CgroupStats,
    GuestDetails,
    GuestInterface,
    GuestNeighbour,
    GuestRoute,
    GuestStats,
    ProcessExit,
    StorageSpec,
)
from protocols import agent_pb2 as pb
from ttrpc import Client, TtrpcError

MAX_PORTS = 256  # listening ports taken from one guest answer
SERVICE = "kata.agent.v1.AgentService"
M = TypeVar("M", bound=Message)

# Seconds per method; None = no deadline (long poll). Guests under TCG are ~20x slower.
TIMEOUTS: Mapping[str, float | None] = {
    "Check": 5.0,
    "Version": 5.0,
    "GetGuestDetails": 10.0,
    "GetGuestStats": 10.0,
    "CreateSandbox": 60.0,
    "DestroySandbox": 30.0,
    "CreateContainer": 120.0,
    "StartContainer": 60.0,
    "ExecProcess": 60.0,
    "SignalProcess": 10.0,
    "ListProcesses": 10.0,
    "RemoveContainer": 60.0,
    "RemoveProcess": 10.0,
    "CloseStdin": 10.0,
    "TtyWinResize": 10.0,
    "PauseContainer": 30.0,
    "ResumeContainer": 30.0,
    "UpdateContainer": 30.0,
    "StatsContainer": 10.0,
    "OnlineCPUs": 30.0,
    "OnlineMemory": 30.0,
    "SetGuestDateTime": 10.0,
    "ReseedRandomDev": 10.0,
    "UpdateInterface": 30.0,  # waits up to 10 s for a cold-plugged NIC to be probed
    "UpdateRoutes": 10.0,
    "AddARPNeighbors": 10.0,
    "ListeningPorts": 10.0,
    "PortForwardOpen": 20.0,  # the guest's connect has 10 s per address
    "PortForwardCloseWrite": 10.0,
    "PortForwardClose": 10.0,
    # Port forward reads are long polls, and writes wait while the guest's socket is full.
    "PortForwardRead": None,
    "PortForwardWrite": None,
    # WriteStdin waits while the process does not read its stdin: no deadline either.
    "WriteStdin": None,
    "WaitProcess": None,
    "ReadStdout": None,
    "ReadStderr": None,
}
#: Bytes asked for per ReadStdout/ReadStderr: the agent's pipes hold as much (agent/process.py
#: OUTPUT_PIPE_BYTES), so a busy stream moves in few answers (docs/performance.md "Levers").
READ_CHUNK = 1 << 20


class AgentClient:
    """One connection to one sandbox's agent (implements `agent_client.api.AgentApi`)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    async def connect(cls, address: str, timeout: float) -> AgentClient:
        """Connect and wait until the agent answers Check (the guest may still be booting):
        the whole boot fits in ``timeout``, not the table's Check deadline."""
        reader, writer = await asyncio.wait_for(open_stream(address), timeout)
        agent = cls(Client(reader, writer))
        try:
            await agent._call("Check", pb.CheckRequest(), pb.HealthCheckResponse, timeout)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        await self._client.close()

    async def wait_closed(self) -> None:
        """Return once the connection has ended (EOF, I/O error, protocol violation)."""
        await self._client.closed.wait()

    async def health_check(self, timeout: float) -> None:
        """Check: the agent answers (raises `AgentCallError` otherwise)."""
        await self._call("Check", pb.CheckRequest(), pb.HealthCheckResponse, timeout)

    async def _call(
        self, method: str, request: Message, response_type: type[M], timeout: float | None = None
    ) -> M:
        """One call, with ``timeout`` or else the method's deadline from ``TIMEOUTS``."""
        deadline = timeout if timeout is not None else TIMEOUTS[method]
        try:
            return await self._client.call(
                SERVICE, method, request, response_type, timeout=deadline
            )
        except TtrpcError as e:
            raise AgentCallError(method, e.code, e.message) from e

    # sandbox
    async def create_sandbox(
        self, sandbox_id: str, hostname: str, storages: Iterable[StorageSpec]
    ) -> None:
        """CreateSandbox: hostname and the shared filesystems."""
        request = pb.CreateSandboxRequest(
            sandbox_id=sandbox_id, hostname=hostname, storages=[_storage(s) for s in storages]
        )
        await self._call("CreateSandbox", request, Empty)

    async def destroy_sandbox(self) -> None:
        """DestroySandbox: the agent stops every container and unmounts."""
        await self._call("DestroySandbox", pb.DestroySandboxRequest(), Empty)

    async def guest_details(self) -> GuestDetails:
        """GetGuestDetails."""
        r = await self._call("GetGuestDetails", pb.GuestDetailsRequest(), pb.GuestDetailsResponse)
        # Untrusted values that end up in logs and state.json: keep them short and plain.
        return GuestDetails(
            kernel_release=_printable(r.kernel_release, 64),
            agent_version=_printable(r.agent_details.version, 64),
            agent_startup_seconds=r.agent_startup_seconds,
            agent_init_seconds=r.agent_init_seconds,
        )

    # containers and processes
    async def create_container(
        self, container_id: str, spec: dict[str, Any], terminal: bool, stdin: bool
    ) -> None:
        """CreateContainer with the guest spec."""
        request = pb.CreateContainerRequest(
            container_id=container_id,
            oci_spec_json=json.dumps(spec).encode(),
            terminal=terminal,
            stdin=stdin,
        )
        await self._call("CreateContainer", request, Empty)

    async def start_container(self, container_id: str) -> int:
        """StartContainer; returns the guest pid of the init process."""
        request = pb.StartContainerRequest(container_id=container_id)
        return (await self._call("StartContainer", request, pb.StartContainerResponse)).pid

    async def exec_process(
        self, container_id: str, exec_id: str, process: dict[str, Any], stdin: bool
    ) -> int:
        """ExecProcess; returns the guest pid."""
        request = pb.ExecProcessRequest(
            container_id=container_id,
            exec_id=exec_id,
            process_json=json.dumps(process).encode(),
            stdin=stdin,
        )
        return (await self._call("ExecProcess", request, pb.ExecProcessResponse)).pid

    async def signal_process(
        self, container_id: str, exec_id: str, signal: int, all: bool = False
    ) -> None:
        """SignalProcess."""
        request = pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all
        )
        await self._call("SignalProcess", request, Empty)

    async def wait_process(self, container_id: str, exec_id: str) -> ProcessExit:
        """WaitProcess (long poll): the exit status, and whether an OOM kill ended it."""
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        r = await self._call("WaitProcess", request, pb.WaitProcessResponse)
        return ProcessExit(r.status, r.oom_killed)

    # cgroup
    async def pause_container(self, container_id: str) -> None:
        """PauseContainer: freeze the container's cgroup."""
        await self._call("PauseContainer", pb.PauseContainerRequest(container_id=container_id),
                         Empty)

    async def resume_container(self, container_id: str) -> None:
        """ResumeContainer: thaw it."""
        await self._call("ResumeContainer",
                         pb.ResumeContainerRequest(container_id=container_id), Empty)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """UpdateContainer with OCI LinuxResources."""
        request = pb.UpdateContainerRequest(container_id=container_id,
                                            resources_json=json.dumps(resources).encode())
        await self._call("UpdateContainer", request, Empty)

    async def online_cpus(self, wanted: int) -> int:
        """OnlineCPUs: bring hot-plugged vCPUs online; how many are online."""
        r = await self._call("OnlineCPUs", pb.OnlineCPUsRequest(wanted=wanted),
                             pb.OnlineCPUsResponse)
        return int(r.online)

    async def online_memory(self, wanted_mib: int) -> int:
        """OnlineMemory: bring hot-plugged memory online; the MiB online."""
        r = await self._call("OnlineMemory", pb.OnlineMemoryRequest(wanted_mib=wanted_mib),
                             pb.OnlineMemoryResponse)
        return int(r.online_mib)

    # a VM restored from a template
    async def set_guest_time(self, sec: int, usec: int) -> None:
        """SetGuestDateTime: set the guest's wall clock (seconds and microseconds since the
        Epoch)."""
        request = pb.SetGuestDateTimeRequest(Sec=sec, Usec=usec)
        await self._call("SetGuestDateTime", request, Empty)

    async def reseed_random(self, data: bytes) -> None:
        """ReseedRandomDev: mix ``data`` into the guest kernel's RNG and reseed it."""
        await self._call("ReseedRandomDev", pb.ReseedRandomDevRequest(data=data), Empty)

    # network
    async def update_interface(self, interface: GuestInterface) -> None:
        """UpdateInterface: set up one guest NIC."""
        addresses = []
        for text in interface.addresses:
            address, _, prefix = text.partition("/")
            family = pb.v6 if ":" in address else pb.v4
            addresses.append(pb.IPAddress(family=family, address=address, mask=prefix))
        request = pb.UpdateInterfaceRequest(interface=pb.Interface(
            name=interface.name, hwAddr=interface.mac, mtu=interface.mtu,
            IPAddresses=addresses))
        await self._call("UpdateInterface", request, pb.Interface)

    async def update_routes(self, routes: Iterable[GuestRoute]) -> None:
        """UpdateRoutes: add the pod's routes in the guest."""
        request = pb.UpdateRoutesRequest(routes=pb.Routes(Routes=[
            pb.Route(dest=r.destination, gateway=r.gateway, device=r.device, source=r.source,
                     family=pb.v6 if r.ipv6 else pb.v4)
            for r in routes]))  # fmt: skip
        await self._call("UpdateRoutes", request, pb.Routes)

    async def add_arp_neighbors(self, neighbours: Iterable[GuestNeighbour]) -> None:
        """AddARPNeighbors: permanent neighbour entries in the guest."""
        request = pb.AddARPNeighborsRequest(neighbors=pb.ARPNeighbors(ARPNeighbors=[
            pb.ARPNeighbor(toIPAddress=pb.IPAddress(
                family=pb.v6 if ":" in n.address else pb.v4, address=n.address),
                device=n.device, lladdr=n.mac, state=0x80)
            for n in neighbours]))  # fmt: skip
        await self._call("AddARPNeighbors", request, Empty)

    # port forwarding
    async def listening_ports(self) -> list[int]:
        """ListeningPorts: TCP ports listening in the guest (bounded, validated)."""
        r = await self._call("ListeningPorts", pb.ListeningPortsRequest(),
                             pb.ListeningPortsResponse)
        return sorted({p for p in r.ports[:MAX_PORTS] if 0 < p < 65536})

    async def port_forward_open(self, port: int) -> int:
        """PortForwardOpen: a connection to ``port`` on the guest's loopback; its id."""
        r = await self._call("PortForwardOpen", pb.PortForwardOpenRequest(port=port),
                             pb.PortForwardOpenResponse)
        return int(r.id)

    async def port_forward_read(self, conn_id: int, size: int) -> bytes:
        """PortForwardRead: the next bytes from the guest; b"" at end of stream."""
        r = await self._call("PortForwardRead", pb.PortForwardReadRequest(id=conn_id, size=size),
                             pb.PortForwardReadResponse)
        return bytes(r.data[:size])

    async def port_forward_write(self, conn_id: int, data: bytes) -> None:
        """PortForwardWrite: bytes to the guest's end of the connection."""
        await self._call("PortForwardWrite", pb.PortForwardWriteRequest(id=conn_id, data=data),
                         Empty)

    async def port_forward_close_write(self, conn_id: int) -> None:
        """PortForwardCloseWrite: no more bytes to the guest (FIN)."""
        await self._call("PortForwardCloseWrite", pb.PortForwardRequest(id=conn_id), Empty)

    async def port_forward_close(self, conn_id: int) -> None:
        """PortForwardClose: forget the connection."""
        await self._call("PortForwardClose", pb.PortForwardRequest(id=conn_id), Empty)

    async def guest_stats(self) -> GuestStats:
        """GetGuestStats: the guest's memory and load (untrusted: only finite, non-negative
        numbers pass; anything else reads as 0)."""
        r = await self._call("GetGuestStats", pb.GuestStatsRequest(), pb.GuestStatsResponse)
        return GuestStats(
            mem_total_bytes=r.mem_total_bytes, mem_free_bytes=r.mem_free_bytes,
            mem_available_bytes=r.mem_available_bytes, load1=_gauge(r.load1),
            load5=_gauge(r.load5), load15=_gauge(r.load15),
            uptime_seconds=_gauge(r.uptime_seconds), agent_rss_bytes=r.agent_rss_bytes,
        )

    async def stats_container(self, container_id: str) -> CgroupStats:
        """StatsContainer: the container's cgroup figures (maps bounded: the guest sent them)."""
        request = pb.StatsContainerRequest(container_id=container_id)
        r = await self._call("StatsContainer", request, pb.StatsContainerResponse)
        return CgroupStats(
            cpu_stat=_bounded_map(r.cpu_stat), memory_stat=_bounded_map(r.memory_stat),
            memory_events=_bounded_map(r.memory_events), memory_current=r.memory_current,
            memory_max=r.memory_max, memory_swap_current=r.memory_swap_current,
            pids_current=r.pids_current, pids_max=r.pids_max,
        )

    async def list_processes(self, container_id: str) -> list[int]:
        """ListProcesses: guest pids of the container."""
        request = pb.ListProcessesRequest(container_id=container_id)
        return list((await self._call("ListProcesses", request, pb.ListProcessesResponse)).pids)

    async def remove_process(self, container_id: str, exec_id: str) -> None:
        """RemoveProcess: forget an exec that has exited."""
        request = pb.RemoveProcessRequest(container_id=container_id, exec_id=exec_id)
        await self._call("RemoveProcess", request, Empty)

    async def remove_container(self, container_id: str, timeout: int = 0) -> None:
        """RemoveContainer: kill what is left and forget it."""
        request = pb.RemoveContainerRequest(container_id=container_id, timeout=timeout)
        await self._call("RemoveContainer", request, Empty)

    # stdio
    async def read_stdout(self, container_id: str, exec_id: str) -> bytes:
        """ReadStdout (long poll); b"" at end of stream."""
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=READ_CHUNK)
        return (await self._call("ReadStdout", request, pb.ReadStreamResponse)).data

    async def read_stderr(self, container_id: str, exec_id: str) -> bytes:
        """ReadStderr (long poll); b"" at end of stream."""
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=READ_CHUNK)
        return (await self._call("ReadStderr", request, pb.ReadStreamResponse)).data

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """WriteStdin; returns the bytes taken."""
        request = pb.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data)
        return (await self._call("WriteStdin", request, pb.WriteStreamResponse)).len

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        """CloseStdin."""
        request = pb.CloseStdinRequest(container_id=container_id, exec_id=exec_id)
        await self._call("CloseStdin", request, Empty)

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        """TtyWinResize."""
        request = pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=cols
        )
        await self._call("TtyWinResize", request, Empty)


MAX_STAT_KEYS = 128
MAX_STAT_KEY = 64


def _bounded_map(values: Mapping[str, int]) -> dict[str, int]:
    """At most MAX_STAT_KEYS plain keys of a guest-sent map; the rest is dropped."""
    kept: dict[str, int] = {}
    for key, value in values.items():
        if len(kept) >= MAX_STAT_KEYS:
            break
        if len(key) <= MAX_STAT_KEY and key.replace("_", "").isalnum() and key.isascii():
            kept[key] = value
    return kept


def _gauge(value: float) -> float:
    """A guest-sent double as a gauge: NaN, infinities and negatives read as 0."""
    return value if math.isfinite(value) and value >= 0 else 0.0


def _printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` chars, with anything but plain ASCII replaced by '?'."""
    return "".join(c if " " < c < "\x7f" else "?" for c in text[:limit])


def _storage(s: StorageSpec) -> pb.Storage:
    return pb.Storage(
        driver=s.driver,
        source=s.source,
        fstype=s.fstype,
        mount_point=s.mount_point,
        options=list(s.options),
    )


async def connect_agent(address: str, timeout: float) -> AgentClient:
    """`AgentClient.connect` as an `agent_client.api.AgentConnector`."""
    return await AgentClient.connect(address, timeout)
