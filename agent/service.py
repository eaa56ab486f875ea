"""The ``kata.agent.v1.AgentService`` ttrpc handlers.

Theory of operation
-------------------
A thin adapter: each handler validates and unpacks its protobuf request, calls
:class:`~agent.container.Containers` / :class:`~agent.storage.Storages`, and packs the
reply. The core raises :class:`agent.errors.AgentError` (wire-free); :func:`_api` turns
that into ``TtrpcError`` with the same status code, and an ``OSError`` into INTERNAL, so
the host always gets a code it can act on (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
INVALID_ARGUMENT). Handlers run concurrently (ttrpc serves each request in its own task):
WaitProcess and ReadStdout are long polls that park on futures/fds, never on the loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from agent import validate
from agent.container import Containers
from agent.errors import AgentError, FailedPrecondition, InvalidArgument
from agent.netlink import loopback_up
from agent.storage import StorageRequest, Storages

if TYPE_CHECKING:
    from agent.handover import Handover
    from agent.network import GuestNetwork
    from agent.portforward import PortForwards
from protocols import agent_pb2 as pb
from ttrpc import Code, TtrpcError, wire
from ttrpc.pipepayload import PipePayload

SERVICE = "kata.agent.v1.AgentService"
AGENT_VERSION = "0.1.0"

# What sethostname(2) takes and runc passes on: 1-64 bytes; we refuse only the unprintable.
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,63})")

Req = TypeVar("Req", bound=Message)
#: bytes: an encoded answer; PipePayload: one still partly in a pipe (ttrpc.server)
Answer = Message | bytes | PipePayload
Handler = Callable[[Any], Awaitable[Answer]]


class StartupInfo:
    """Measured by main when serving began; reported by GetGuestDetails. (A plain class:
    a dataclass costs the guest's start-up ~20 ms under TCG.)"""

    __slots__ = ("init_seconds", "uptime_seconds")

    def __init__(self, init_seconds: float = 0.0, uptime_seconds: float = 0.0) -> None:
        self.init_seconds = init_seconds      # agent exec (interpreter start) -> serving
        self.uptime_seconds = uptime_seconds  # guest uptime when serving began


def read_stream_response(data: bytes | PipePayload) -> bytes | PipePayload:
    """ReadStreamResponse{data = 1}, encoded: the message would copy the data twice more,
    ~0.1 s per 16 MiB of a container's output under TCG (docs/performance.md "Levers").
    Data still in its pipe gets the field's tag and length as its head."""
    if isinstance(data, bytes):
        return wire.bytes_field(1, data)
    data.head = wire.field_prefix(1, data.size)
    return data


def _api(fn: Callable[[Req], Awaitable[Answer]]) -> Callable[[Req], Awaitable[Answer]]:
    async def handler(request: Req) -> Answer:
        try:
            return await fn(request)
        except AgentError as exc:
            raise TtrpcError(Code(exc.code), str(exc)) from exc
        except OSError as exc:
            raise TtrpcError(Code.INTERNAL, str(exc)) from exc

    handler.__name__ = fn.__name__
    return handler


class AgentService:
    def __init__(self, containers: Containers, storages: Storages, startup: StartupInfo,
                 set_hostname: bool, network: bool = False,
                 handover: Handover | None = None, vm_ends_with_sandbox: bool = False) -> None:
        self._containers = containers
        # In a VM, DestroySandbox is the last call before the VM stops: crun's state and the
        # bundles are in guest memory and go with it (host mode keeps its state tidy).
        self._vm_ends_with_sandbox = vm_ends_with_sandbox
        self._handover = handover  # made on first use (see `handover`)
        self._in_guest_network = network  # False outside a guest: the host's is not ours
        self._network: GuestNetwork | None = None
        self._forwards: PortForwards | None = None
        self._storages = storages
        self._startup = startup
        self._set_hostname = set_hostname
        self.hostname = ""

    def methods(self) -> dict[str, tuple[type[Message], Handler]]:
        """The method table for ``ttrpc.Server.register(SERVICE, ...)``."""
        table: dict[str, tuple[type[Message], Handler]] = {
            "CreateSandbox": (pb.CreateSandboxRequest, self.create_sandbox),
            "DestroySandbox": (pb.DestroySandboxRequest, self.destroy_sandbox),
            "GetGuestDetails": (pb.GuestDetailsRequest, self.get_guest_details),
            "GetGuestStats": (pb.GuestStatsRequest, self.get_guest_stats),
            "CreateContainer": (pb.CreateContainerRequest, self.create_container),
            "StartContainer": (pb.StartContainerRequest, self.start_container),
            "RemoveContainer": (pb.RemoveContainerRequest, self.remove_container),
            "ExecProcess": (pb.ExecProcessRequest, self.exec_process),
            "SignalProcess": (pb.SignalProcessRequest, self.signal_process),
            "WaitProcess": (pb.WaitProcessRequest, self.wait_process),
            "ListProcesses": (pb.ListProcessesRequest, self.list_processes),
            "RemoveProcess": (pb.RemoveProcessRequest, self.remove_process),
            "WriteStdin": (pb.WriteStreamRequest, self.write_stdin),
            "ReadStdout": (pb.ReadStreamRequest, self.read_stdout),
            "ReadStderr": (pb.ReadStreamRequest, self.read_stderr),
            "CloseStdin": (pb.CloseStdinRequest, self.close_stdin),
            "TtyWinResize": (pb.TtyWinResizeRequest, self.tty_win_resize),
            "PauseContainer": (pb.PauseContainerRequest, self.pause_container),
            "ResumeContainer": (pb.ResumeContainerRequest, self.resume_container),
            "UpdateContainer": (pb.UpdateContainerRequest, self.update_container),
            "StatsContainer": (pb.StatsContainerRequest, self.stats_container),
            "OnlineCPUs": (pb.OnlineCPUsRequest, self.online_cpus),
            "OnlineMemory": (pb.OnlineMemoryRequest, self.online_memory),
            "SetGuestDateTime": (pb.SetGuestDateTimeRequest, self.set_guest_date_time),
            "ReseedRandomDev": (pb.ReseedRandomDevRequest, self.reseed_random_dev),
            "UpdateInterface": (pb.UpdateInterfaceRequest, self.update_interface),
            "UpdateRoutes": (pb.UpdateRoutesRequest, self.update_routes),
            "AddARPNeighbors": (pb.AddARPNeighborsRequest, self.add_arp_neighbors),
            "ListeningPorts": (pb.ListeningPortsRequest, self.listening_ports),
            "PortForwardOpen": (pb.PortForwardOpenRequest, self.port_forward_open),
            "PortForwardRead": (pb.PortForwardReadRequest, self.port_forward_read),
            "PortForwardWrite": (pb.PortForwardWriteRequest, self.port_forward_write),
            "PortForwardCloseWrite": (pb.PortForwardRequest, self.port_forward_close_write),
            "PortForwardClose": (pb.PortForwardRequest, self.port_forward_close),
            "Check": (pb.CheckRequest, self.check),
            "Version": (pb.CheckRequest, self.version),
        }
        return {name: (req, _api(fn)) for name, (req, fn) in table.items()}

    # -- sandbox ----------------------------------------------------------------------

    async def create_sandbox(self, req: pb.CreateSandboxRequest) -> Message:
        if req.hostname:
            if not _HOSTNAME.fullmatch(req.hostname):
                raise InvalidArgument(f"invalid hostname {req.hostname!r}")
            if self._set_hostname:  # never on the host (test mode): it is not ours
                socket.sethostname(req.hostname)
            self.hostname = req.hostname
        if self._in_guest_network:
            await asyncio.to_thread(loopback_up)
        for st in req.storages:
            await self._storages.add(StorageRequest(st.driver, st.source, st.fstype,
                                                    tuple(st.options), st.mount_point))
        return empty_pb2.Empty()

    async def destroy_sandbox(self, req: pb.DestroySandboxRequest) -> Message:
        errors: list[str] = []
        try:
            await self._containers.remove_all(keep_state=self._vm_ends_with_sandbox)
        except AgentError as e:  # unmount the storages all the same
            errors.append(str(e))
        if self._forwards is not None:
            self._forwards.close_all()
        errors += self._storages.remove_all()
        if errors:
            raise TtrpcError(Code.INTERNAL, "; ".join(errors))
        return empty_pb2.Empty()

    async def get_guest_details(self, req: pb.GuestDetailsRequest) -> Message:
        return pb.GuestDetailsResponse(
            agent_details=pb.AgentDetails(
                version=AGENT_VERSION, init_daemon=os.getpid() == 1,
                storage_handlers=["virtio-fs", "9p", "local"],
            ),
            kernel_release=os.uname().release,
            agent_startup_seconds=self._startup.uptime_seconds,
            agent_init_seconds=self._startup.init_seconds,
        )

    # -- network ----------------------------------------------------------------------

    def _guest_network(self) -> GuestNetwork:
        if not self._in_guest_network:
            raise FailedPrecondition("this agent does not run in a guest: it leaves the "
                                     "network alone")
        if self._network is None:  # imported on first use: pods without network skip it
            from agent import init
            from agent.network import GuestNetwork

            self._network = GuestNetwork(init.DEVICE_MODULES.load_present)
        return self._network

    @property
    def forwards(self) -> PortForwards:
        """The port-forward connections (the module is imported on first use)."""
        if self._forwards is None:
            from agent.portforward import PortForwards

            self._forwards = PortForwards()
        return self._forwards

    async def update_interface(self, req: pb.UpdateInterfaceRequest) -> Message:
        return await self._guest_network().update_interface(req)

    async def update_routes(self, req: pb.UpdateRoutesRequest) -> Message:
        return await self._guest_network().update_routes(req)

    async def add_arp_neighbors(self, req: pb.AddARPNeighborsRequest) -> Message:
        await self._guest_network().add_neighbours(req)
        return empty_pb2.Empty()

    # -- port forwarding --------------------------------------------------------------

    async def listening_ports(self, req: pb.ListeningPortsRequest) -> Message:
        from agent.portforward import listening_ports

        return pb.ListeningPortsResponse(ports=listening_ports())

    async def port_forward_open(self, req: pb.PortForwardOpenRequest) -> Message:
        return pb.PortForwardOpenResponse(id=await self.forwards.open(req.port))

    async def port_forward_read(self, req: pb.PortForwardReadRequest) -> Message:
        data = await self.forwards.read(req.id, validate.read_len(req.size))
        return pb.PortForwardReadResponse(data=data)

    async def port_forward_write(self, req: pb.PortForwardWriteRequest) -> Message:
        validate.check_size("data", len(req.data), validate.MAX_WRITE)
        await self.forwards.write(req.id, req.data)
        return empty_pb2.Empty()

    async def port_forward_close_write(self, req: pb.PortForwardRequest) -> Message:
        await self.forwards.close_write(req.id)
        return empty_pb2.Empty()

    async def port_forward_close(self, req: pb.PortForwardRequest) -> Message:
        self.forwards.close(req.id)
        return empty_pb2.Empty()

    async def get_guest_stats(self, req: pb.GuestStatsRequest) -> Message:
        from agent import sysstats  # only when metrics are scraped: keep start-up lean

        return pb.GuestStatsResponse(**sysstats.guest_stats())  # type: ignore[arg-type]

    async def check(self, req: pb.CheckRequest) -> Message:
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)

    async def version(self, req: pb.CheckRequest) -> Message:
        return pb.VersionCheckResponse(grpc_version="ttrpc", agent_version=AGENT_VERSION)

    # -- containers and processes -----------------------------------------------------

    async def create_container(self, req: pb.CreateContainerRequest) -> Message:
        if req.exec_id:
            validate.check_exec_id(req.exec_id)  # informational only, like Kata's
        await self._containers.create(req.container_id, req.oci_spec_json,
                                      req.terminal, req.stdin)
        return empty_pb2.Empty()

    async def start_container(self, req: pb.StartContainerRequest) -> Message:
        return pb.StartContainerResponse(pid=await self._containers.start(req.container_id))

    async def remove_container(self, req: pb.RemoveContainerRequest) -> Message:
        await self._containers.remove(req.container_id, float(req.timeout) or None)
        return empty_pb2.Empty()

    async def remove_process(self, req: pb.RemoveProcessRequest) -> Message:
        await self._containers.remove_exec(req.container_id, req.exec_id)
        return empty_pb2.Empty()

    async def exec_process(self, req: pb.ExecProcessRequest) -> Message:
        pid = await self._containers.exec(req.container_id, req.exec_id, req.process_json,
                                          req.stdin)
        return pb.ExecProcessResponse(pid=pid)

    async def signal_process(self, req: pb.SignalProcessRequest) -> Message:
        self._containers.signal(req.container_id, req.exec_id, req.signal, req.all)
        return empty_pb2.Empty()

    async def wait_process(self, req: pb.WaitProcessRequest) -> Message:
        process = self._containers.process(req.container_id, req.exec_id)
        status = await process.wait()
        return pb.WaitProcessResponse(
            status=status, oom_killed=self._containers.oom_killed(req.container_id, req.exec_id))

    async def list_processes(self, req: pb.ListProcessesRequest) -> Message:
        return pb.ListProcessesResponse(pids=self._containers.pids(req.container_id))

    # -- cgroup -----------------------------------------------------------------------

    async def pause_container(self, req: pb.PauseContainerRequest) -> Message:
        await self._containers.pause(req.container_id)
        return empty_pb2.Empty()

    async def resume_container(self, req: pb.ResumeContainerRequest) -> Message:
        await self._containers.resume(req.container_id)
        return empty_pb2.Empty()

    async def update_container(self, req: pb.UpdateContainerRequest) -> Message:
        await self._containers.update(req.container_id, req.resources_json)
        return empty_pb2.Empty()

    async def stats_container(self, req: pb.StatsContainerRequest) -> Message:
        return pb.StatsContainerResponse(**self._containers.stats(req.container_id))  # type: ignore[arg-type]

    async def online_cpus(self, req: pb.OnlineCPUsRequest) -> Message:
        from agent import hotplug  # only when vCPUs are hot-plugged: keep start-up lean

        wanted = min(req.wanted, 1024)
        return pb.OnlineCPUsResponse(online=await hotplug.bring_online(wanted))

    async def online_memory(self, req: pb.OnlineMemoryRequest) -> Message:
        from agent import hotplug

        wanted = min(req.wanted_mib, 1 << 24)
        return pb.OnlineMemoryResponse(online_mib=await hotplug.bring_memory_online(wanted))

    # -- a VM restored from a template ------------------------------------------------

    @property
    def handover(self) -> Handover:
        """Clock and RNG hand-over (the module is imported on first use: only a VM
        restored from a template needs it)."""
        if self._handover is None:
            from agent.handover import Handover

            self._handover = Handover()
        return self._handover

    async def set_guest_date_time(self, req: pb.SetGuestDateTimeRequest) -> Message:
        self.handover.set_time(req.Sec, req.Usec)
        return empty_pb2.Empty()

    async def reseed_random_dev(self, req: pb.ReseedRandomDevRequest) -> Message:
        self.handover.reseed(req.data)
        return empty_pb2.Empty()

    # -- stdio ------------------------------------------------------------------------

    async def write_stdin(self, req: pb.WriteStreamRequest) -> Message:
        validate.check_size("data", len(req.data), validate.MAX_WRITE)
        process = self._containers.process(req.container_id, req.exec_id)
        return pb.WriteStreamResponse(len=await process.stdin.write(req.data))

    async def read_stdout(self, req: pb.ReadStreamRequest) -> bytes | PipePayload:
        process = self._containers.process(req.container_id, req.exec_id)
        return read_stream_response(await process.stdout.take(validate.read_len(req.len)))

    async def read_stderr(self, req: pb.ReadStreamRequest) -> bytes | PipePayload:
        process = self._containers.process(req.container_id, req.exec_id)
        return read_stream_response(await process.stderr.take(validate.read_len(req.len)))

    async def close_stdin(self, req: pb.CloseStdinRequest) -> Message:
        await self._containers.process(req.container_id, req.exec_id).stdin.close()
        return empty_pb2.Empty()

    async def tty_win_resize(self, req: pb.TtyWinResizeRequest) -> Message:
        process = self._containers.process(req.container_id, req.exec_id)
        if not process.terminal:
            raise InvalidArgument("the process has no terminal")
        if not (0 < req.row <= 0xFFFF and 0 < req.column <= 0xFFFF):
            raise InvalidArgument(f"invalid window size {req.row}x{req.column}")
        process.resize(req.row, req.column)
        return empty_pb2.Empty()
