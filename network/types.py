"""A pod's network, described: what CNI put in the netns, and what the VM gets of it.

Every value validates itself in ``__post_init__`` (interface names, MACs, MTUs, address
families), raising `ValueError` that names the field: a description built from netlink
replies, or from anything else, is well-formed or does not exist.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

IFNAMSIZ = 16  # including the NUL: names are at most 15 bytes
MIN_MTU, MAX_MTU = 68, 65535
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Interface_ = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_ifname(name: str) -> str:
    """A Linux interface name: 1-15 bytes, no '/', no whitespace, not '.' or '..'."""
    if (not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name in (".", "..")
            or any(c.isspace() for c in name)):  # fmt: skip
        raise ValueError(f"invalid interface name {name!r}: use 1-15 characters, no / or spaces")
    return name


def check_mac(mac: str) -> str:
    """A unicast MAC address in lowercase colon form."""
    if not _MAC.match(mac):
        raise ValueError(f"invalid MAC address {mac!r}: expected aa:bb:cc:dd:ee:ff (lowercase)")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"invalid MAC address {mac!r}: multicast, not a NIC address")
    return mac


@dataclass(frozen=True)
class IpAddress:
    """An address with its prefix, e.g. 10.88.0.5/16 or fd00::5/64."""

    cidr: Interface_

    @classmethod
    def parse(cls, text: str) -> IpAddress:
        """From ``addr/prefix``; ValueError if it is not one."""
        return cls(ipaddress.ip_interface(text))


@dataclass(frozen=True)
class Interface:
    """A pod interface (CNI's veth end, usually eth0) and what the guest NIC copies of it."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[IpAddress, ...] = ()

    def __post_init__(self) -> None:
        check_ifname(self.name)
        check_mac(self.mac)
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"invalid MTU {self.mtu} on {self.name}: {MIN_MTU}-{MAX_MTU}")


@dataclass(frozen=True)
class Route:
    """A route of the pod netns; ``destination`` None is the default route."""

    device: str
    destination: Network | None = None
    gateway: Address | None = None
    source: Address | None = None

    def __post_init__(self) -> None:
        check_ifname(self.device)
        versions = {a.version for a in (self.destination, self.gateway, self.source) if a}
        if len(versions) > 1:
            raise ValueError(f"invalid route via {self.device}: mixes IPv4 and IPv6")


@dataclass(frozen=True)
class Neighbour:
    """A static ARP/NDP entry to copy into the guest."""

    device: str
    address: Address
    mac: str

    def __post_init__(self) -> None:
        check_ifname(self.device)
        check_mac(self.mac)


@dataclass(frozen=True)
class NetworkDescription:
    """Everything of a pod netns the VM must reproduce."""

    netns_path: str
    interfaces: tuple[Interface, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbours: tuple[Neighbour, ...] = ()

    def __post_init__(self) -> None:
        names = [i.name for i in self.interfaces]
        if len(set(names)) != len(names):
            raise ValueError(f"invalid network description: duplicate interfaces {names}")
        items: tuple[Route | Neighbour, ...] = (*self.routes, *self.neighbours)
        for item in items:
            if item.device not in names:
                raise ValueError(
                    f"invalid network description: {type(item).__name__} on unknown "
                    f"interface {item.device!r}"
                )


@dataclass(frozen=True)
class Endpoint:
    """One interface wired for a VM: the tap (or macvtap) we created and its queue fds.

    ``created`` lists every link we made in the netns, so they are removed, also after a
    crash (it is persisted in the sandbox's state).
    """

    interface: Interface
    model: str
    tap_name: str
    queue_fds: tuple[int, ...]
    created: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.model not in ("tcfilter", "macvtap"):
            raise ValueError(f"invalid endpoint model {self.model!r}: tcfilter or macvtap")
        check_ifname(self.tap_name)
        if not self.queue_fds or any(fd < 0 for fd in self.queue_fds):
            raise ValueError(f"invalid endpoint {self.tap_name}: needs open queue fds")


def description_to_json(d: NetworkDescription) -> dict[str, Any]:
    """A JSON-ready form of ``d`` (what the netlink worker sends back)."""
    def text(a: object) -> str | None:
        return None if a is None else str(a)

    return {
        "netns_path": d.netns_path,
        "interfaces": [interface_to_json(i) for i in d.interfaces],
        "routes": [{"device": r.device, "destination": text(r.destination),
                    "gateway": text(r.gateway), "source": text(r.source)} for r in d.routes],
        "neighbours": [{"device": n.device, "address": str(n.address), "mac": n.mac}
                       for n in d.neighbours],
    }


def interface_to_json(i: Interface) -> dict[str, Any]:
    return {"name": i.name, "mac": i.mac, "mtu": i.mtu,
            "addresses": [str(a.cidr) for a in i.addresses]}


def interface_from_json(doc: dict[str, Any]) -> Interface:
    """Parse `interface_to_json`'s form; ValueError (or KeyError/TypeError) if malformed."""
    return Interface(str(doc["name"]), str(doc["mac"]), int(doc["mtu"]),
                     tuple(IpAddress.parse(str(a)) for a in doc["addresses"]))


def description_from_json(doc: dict[str, Any]) -> NetworkDescription:
    """Parse `description_to_json`'s form; every value validates itself again."""
    def addr(text: object) -> Address | None:
        return None if text is None else ipaddress.ip_address(str(text))

    return NetworkDescription(
        str(doc["netns_path"]),
        tuple(interface_from_json(i) for i in doc["interfaces"]),
        tuple(Route(str(r["device"]),
                    None if r["destination"] is None else ipaddress.ip_network(
                        str(r["destination"])),
                    addr(r["gateway"]), addr(r["source"])) for r in doc["routes"]),
        tuple(Neighbour(str(n["device"]), ipaddress.ip_address(str(n["address"])),
                        str(n["mac"])) for n in doc["neighbours"]),
    )
