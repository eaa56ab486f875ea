"""A sandbox's pod network: the netns's interfaces wired to guest NICs, then the guest
told of their addresses, routes and neighbours.

`wire` scans the netns and attaches every interface with the configured model; each
attach registers its detach on the start-up's exit stack right away and is recorded in
the sandbox's state (`NetworkRecord`) before anything else happens, so a failure unwinds
it and a crash leaves what `cleanup_after_crash` needs. The tap fds
go to the VMM; the sandbox closes its copies once the VMM has them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

from agent_client import AgentApi, GuestInterface, GuestNeighbour, GuestRoute
from hypervisors.base import NetworkDevice
from network import tap
from network.errors import NetworkConfigError, NetworkError
from network.model import NetworkModel
from network.types import Endpoint, NetworkDescription
from sandbox.errors import InvalidArgumentError, UnavailableError
from sandbox.state import NetworkRecord

log = logging.getLogger(__name__)


@dataclass
class PodNetwork:
    """What `wire` made: the scanned description and one endpoint per interface."""

    description: NetworkDescription
    endpoints: list[Endpoint]
    fds_closed: bool = False

    def devices(self) -> list[NetworkDevice]:
        """The guest NICs (same MAC and MTU as the pod interfaces they copy)."""
        return [NetworkDevice(f"net{i}", e.interface.mac, e.interface.mtu, e.queue_fds)
                for i, e in enumerate(self.endpoints)]  # fmt: skip

    def close_fds(self) -> None:
        """Close our copies of the queue fds (the VMM holds its own); once only, as a
        closed fd's number may be reused at once."""
        if self.fds_closed:
            return
        self.fds_closed = True
        for e in self.endpoints:
            tap.close_all(e.queue_fds)


async def wire(model: NetworkModel, netns_path: str, stack: AsyncExitStack,
               record: Callable[[NetworkRecord], None]) -> PodNetwork:
    """Scan ``netns_path`` and attach each interface; undo registered on ``stack``."""
    started = time.monotonic()
    try:
        description = await model.scan(netns_path)
    except NetworkConfigError as e:
        raise InvalidArgumentError(f"failed to wire the pod's network: {e}") from e
    except (NetworkError, OSError) as e:
        raise UnavailableError(f"failed to read the pod's network {netns_path}: {e}") from e
    wired = PodNetwork(description, [])
    stack.callback(wired.close_fds)
    for position, interface in enumerate(description.interfaces):
        try:
            endpoint = await model.attach(netns_path, interface, position)
        except NetworkConfigError as e:
            raise InvalidArgumentError(f"failed to wire {interface.name}: {e}") from e
        except (NetworkError, OSError) as e:
            raise UnavailableError(f"failed to wire {interface.name} ({model.name}): "
                                   f"{e}") from e
        wired.endpoints.append(endpoint)
        stack.push_async_callback(model.detach, netns_path, endpoint)
        record(NetworkRecord(netns_path, model.name, interface.name, endpoint.tap_name))
    log.info("pod network %s wired with %s in %.2fs: %s", netns_path, model.name,
             time.monotonic() - started,
             ", ".join(f"{e.interface.name}->{e.tap_name}" for e in wired.endpoints))
    return wired


async def configure_guest(agent: AgentApi, wired: PodNetwork) -> None:
    """Give each guest NIC its pod interface's name and addresses; then routes, neighbours."""
    d = wired.description
    for i in d.interfaces:
        await agent.update_interface(GuestInterface(
            i.name, i.mac, i.mtu, tuple(str(a.cidr) for a in i.addresses)))
    if d.routes:
        await agent.update_routes([GuestRoute(
            r.device, str(r.destination) if r.destination else "",
            str(r.gateway) if r.gateway else "", str(r.source) if r.source else "",
            ipv6=6 in {a.version for a in (r.destination, r.gateway, r.source) if a})
            for r in d.routes])  # fmt: skip
    if d.neighbours:
        await agent.add_arp_neighbors([GuestNeighbour(n.device, str(n.address), n.mac)
                                       for n in d.neighbours])
