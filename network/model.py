"""`NetworkModel`: the seam between a sandbox and its pod netns (``internetworking_model``).

A model scans the netns (`scan`), wires one interface to a tap the VMM can use (`attach`:
``tcfilter`` redirects between veth and tap with tc; ``macvtap`` stacks a passthru
macvtap on the veth), and undoes that (`detach`, idempotent, also from a
persisted record after a crash: `detach_recorded`). All netlink work happens here,
through pyroute2 on a thread inside the netns, never by running ``ip`` or ``tc``. pyroute2
is imported on first use: ``shim start`` and ``shim delete`` of a pod without network
never pay for it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from network import rtnl, tap
from network.netns import in_netns, run_in_netns
from network.types import Endpoint, Interface, NetworkDescription

MODELS = ("tcfilter", "macvtap")
T = TypeVar("T")


class NetworkModel(Protocol):
    """How a pod's interfaces reach its VM."""

    @property
    def name(self) -> str:
        """``tcfilter`` or ``macvtap``."""

    async def scan(self, netns_path: str) -> NetworkDescription:
        """What CNI put in the netns (interfaces, routes, neighbours)."""

    async def attach(self, netns_path: str, interface: Interface, position: int) -> Endpoint:
        """Create what the VMM needs for ``interface`` (the ``position``-th); its queue
        fds are the caller's to close once the VMM has them."""

    async def detach(self, netns_path: str, endpoint: Endpoint) -> None:
        """Remove everything `attach` created (idempotent)."""


def _with_ipr(fn: Callable[[Any], T]) -> Callable[[], T]:
    def run() -> T:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            return fn(ipr)

    return run


class NetlinkModel:
    """Both models: they differ in what `attach` stacks on the interface."""

    def __init__(self, name: str, queues: int = 1) -> None:
        if name not in MODELS:
            raise ValueError(f"unknown internetworking_model {name!r}: tcfilter, macvtap or none")
        self._name = name
        self.queues = queues

    @property
    def name(self) -> str:
        return self._name

    def tap_name(self, position: int) -> str:
        """tap<N>_kata (a tun device, private to its netns); a macvtap's name is unique on
        the host, as its char device is host-wide (open_macvtap_queues checks it)."""
        if self._name == "tcfilter":
            return f"tap{position}_kata"
        return f"mv{secrets.token_hex(3)}_kata"

    async def scan(self, netns_path: str) -> NetworkDescription:
        return await in_netns(netns_path, _with_ipr(lambda ipr: rtnl.scan(ipr, netns_path)))

    async def attach(self, netns_path: str, interface: Interface, position: int) -> Endpoint:
        name = self.tap_name(position)
        wire = rtnl.wire_tcfilter if self._name == "tcfilter" else rtnl.wire_macvtap
        fds = await in_netns(netns_path,
                             _with_ipr(lambda ipr: wire(ipr, interface, name, self.queues)))
        try:
            return Endpoint(interface, self._name, name, fds, (name,))
        except ValueError:
            tap.close_all(fds)
            raise

    async def detach(self, netns_path: str, endpoint: Endpoint) -> None:
        await in_netns(netns_path, _with_ipr(
            lambda ipr: rtnl.unwire(ipr, endpoint.interface.name, endpoint.tap_name)))


def detach_recorded(netns_path: str, interface_name: str, tap_name: str) -> None:
    """`detach` from what a sandbox's state recorded (blocking; for crash cleanup)."""
    run_in_netns(netns_path, _with_ipr(lambda ipr: rtnl.unwire(ipr, interface_name, tap_name)))


def model_for(name: str, queues: int = 1) -> NetworkModel | None:
    """The model ``internetworking_model`` names; None for ``none``."""
    return None if name == "none" else NetlinkModel(name, queues)
