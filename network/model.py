"""`NetworkModel`: the seam between a sandbox and its pod netns (``internetworking_model``).

A model scans the netns (`scan`), wires one interface to a tap the VMM can use (`attach`:
``tcfilter`` redirects between veth and tap with tc; ``macvtap`` stacks a macvtap on the
veth), and undoes that (`detach`, idempotent, also from a persisted `Endpoint` after a
crash). All netlink work happens behind it (pyroute2), never by running ``ip`` or ``tc``.
Implementations land with pod networking; the sandbox layer is written against this.
"""

from __future__ import annotations

from typing import Protocol

from network.types import Endpoint, Interface, NetworkDescription


class NetworkModel(Protocol):
    """How a pod's interfaces reach its VM."""

    @property
    def name(self) -> str:
        """``tcfilter`` or ``macvtap``."""

    async def scan(self, netns_path: str) -> NetworkDescription:
        """What CNI put in the netns (interfaces, routes, neighbours)."""

    async def attach(self, netns_path: str, interface: Interface, queues: int) -> Endpoint:
        """Create what the VMM needs for ``interface``; its queue fds are ours to close."""

    async def detach(self, netns_path: str, endpoint: Endpoint) -> None:
        """Remove everything `attach` created (idempotent)."""
