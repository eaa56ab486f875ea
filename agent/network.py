"""The pod's network inside the guest: each NIC set up as the host's pod interface it
copies (name, MTU, addresses), then routes and static neighbours (Kata's UpdateInterface,
UpdateRoutes, AddARPNeighbors), and loopback up.

Requests are validated before any netlink call: names, MACs, MTUs, addresses and prefix
lengths, and how many of each (`MAX_ITEMS`). Netlink is blocking: every call runs in a
worker thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Callable

from agent import netlink
from agent.errors import AgentError, InvalidArgument, NotFound
from protocols import agent_pb2 as pb

MAX_ITEMS = 256  # addresses, routes or neighbours in one request
NIC_WAIT_SECONDS = 10.0  # a cold-plugged NIC is probed at boot; under TCG it may lag
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ifname(name: str) -> str:
    if not name or len(name.encode()) > 15 or "/" in name or any(c.isspace() for c in name):
        raise InvalidArgument(f"invalid interface name {name!r}")
    return name


def _mac(mac: str) -> str:
    if not _MAC.fullmatch(mac.lower()):
        raise InvalidArgument(f"invalid MAC address {mac!r}")
    return mac.lower()


def _ip(text: str, what: str) -> Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r}") from None


def _cidr(a: pb.IPAddress) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        cidr = ipaddress.ip_interface(f"{a.address}/{a.mask}")
    except ValueError:
        raise InvalidArgument(f"invalid address {a.address}/{a.mask}") from None
    if (cidr.version == 6) != (a.family == pb.v6):
        raise InvalidArgument(f"address {cidr} does not match its family")
    return cidr


def _bounded(items: object, what: str) -> None:
    if len(items) > MAX_ITEMS:  # type: ignore[arg-type]
        raise InvalidArgument(f"too many {what}: at most {MAX_ITEMS}")


class GuestNetwork:
    """Configures the guest's network with netlink (only ever in the guest).

    ``load_drivers`` is called while a NIC is awaited: the guest loads virtio_net only once
    it has a NIC (agent/init.py), and a NIC hot-plugged after the boot needs it then.
    """

    def __init__(self, load_drivers: Callable[[], None] = lambda: None) -> None:
        self._load_drivers = load_drivers

    async def update_interface(self, req: pb.UpdateInterfaceRequest) -> pb.Interface:
        iface = req.interface
        name, mac = _ifname(iface.name), _mac(iface.hwAddr)
        if not 68 <= iface.mtu <= 65535:
            raise InvalidArgument(f"invalid MTU {iface.mtu} for {name}")
        _bounded(iface.IPAddresses, "addresses")
        cidrs = [_cidr(a) for a in iface.IPAddresses]
        device = await asyncio.to_thread(self._set_up, name, mac, int(iface.mtu), cidrs)
        done = pb.Interface()
        done.CopyFrom(iface)
        done.device = device
        return done

    async def update_routes(self, req: pb.UpdateRoutesRequest) -> pb.Routes:
        routes = list(req.routes.Routes)
        _bounded(routes, "routes")
        checked = [_route(r) for r in routes]
        # Routes through a gateway need the gateway's own (link) route first.
        checked.sort(key=lambda pair: pair[1].gateway is not None)
        await asyncio.to_thread(self._add_routes, checked)
        return pb.Routes(Routes=routes)

    async def add_neighbours(self, req: pb.AddARPNeighborsRequest) -> None:
        entries = list(req.neighbors.ARPNeighbors)
        _bounded(entries, "neighbours")
        checked = [(_ifname(n.device), _ip(n.toIPAddress.address, "neighbour address"),
                    _mac(n.lladdr)) for n in entries]  # fmt: skip
        await asyncio.to_thread(self._add_neighbours, checked)

    # -- blocking netlink, in a worker thread ------------------------------------------

    def _set_up(self, name: str, mac: str, mtu: int,
                cidrs: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]) -> str:
        with netlink.Netlink() as nl:
            link = _wait_for_mac(nl, mac, self._load_drivers)
            if link.name != name:
                nl.request(netlink.encode_setlink(nl.next_seq(), link.ifindex, up=False),
                           f"bring {link.name} down")
                nl.request(netlink.encode_setlink(nl.next_seq(), link.ifindex, name=name),
                           f"rename {link.name} to {name}")
            nl.request(netlink.encode_setlink(nl.next_seq(), link.ifindex, mtu=mtu, up=True),
                       f"set {name} up with MTU {mtu}")
            for cidr in cidrs:
                nl.request(netlink.encode_addaddr(nl.next_seq(), link.ifindex, cidr),
                           f"add {cidr} to {name}")
            return link.name

    def _add_routes(self, routes: list[tuple[str, netlink.RouteRequest]]) -> None:
        with netlink.Netlink() as nl:
            indexes = _indexes(nl)
            for device, r in routes:
                index = _index(indexes, device)
                request = netlink.RouteRequest(index, r.destination, r.gateway, r.source,
                                               r.version)
                dest = r.destination or "default"
                nl.request(netlink.encode_addroute(nl.next_seq(), request),
                           f"add route {dest} via {r.gateway or device}")

    def _add_neighbours(self, entries: list[tuple[str, Address, str]]) -> None:
        with netlink.Netlink() as nl:
            indexes = _indexes(nl)
            for device, address, mac in entries:
                nl.request(netlink.encode_addneigh(nl.next_seq(), _index(indexes, device),
                                                   address, mac),
                           f"add neighbour {address} on {device}")


def _route(r: pb.Route) -> tuple[str, netlink.RouteRequest]:
    device = _ifname(r.device)
    try:
        dest = ipaddress.ip_network(r.dest, strict=False) if r.dest else None
    except ValueError:
        raise InvalidArgument(f"invalid route destination {r.dest!r}") from None
    gateway = _ip(r.gateway, "gateway") if r.gateway else None
    source = _ip(r.source, "route source") if r.source else None
    version = 6 if r.family == pb.v6 else 4
    if any(a is not None and a.version != version for a in (dest, gateway, source)):
        raise InvalidArgument(f"route {r.dest or 'default'} via {device} mixes families")
    return device, netlink.RouteRequest(0, dest, gateway, source, version)


def _indexes(nl: netlink.Netlink) -> dict[str, int]:
    """The guest's links by name (one dump per request, not one per route)."""
    return {link.name: link.ifindex for link in nl.links()}


def _index(indexes: dict[str, int], name: str) -> int:
    if name not in indexes:
        raise NotFound(f"no network interface {name!r} in the guest")
    return indexes[name]


def _wait_for_mac(nl: netlink.Netlink, mac: str,
                  load_drivers: Callable[[], None]) -> netlink.Link:
    end = time.monotonic() + NIC_WAIT_SECONDS
    while True:
        for link in nl.links():
            if link.mac == mac:
                return link
        load_drivers()
        if time.monotonic() > end:
            raise NotFound(f"no network interface with MAC {mac} in the guest (is "
                           "virtio_net loaded?)")
        time.sleep(0.05)


__all__ = ["AgentError", "GuestNetwork"]
