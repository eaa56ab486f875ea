"""Just enough rtnetlink for the guest: find a NIC by MAC, rename it, set MTU and up, add
addresses, routes and static neighbours.

Why not pyroute2 in the guest: importing it costs ~135 ms on the host (``python -X
importtime -c 'from pyroute2 import IPRoute'``), about 2.7 s at TCG's ~20x, on every pod's
start; the messages below are a few struct packs. The codec (`encode_*`, `parse_messages`)
is pure and unit-tested; `Netlink` is the small blocking socket around it (the agent calls
it from a worker thread).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # ipaddress costs the agent's start-up ~0.1 s under TCG: types only
    import ipaddress

# message types and flags (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_NEWNEIGH = 28
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_DUMP = 0x300
# attributes
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD = 0x02
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7
NDA_DST, NDA_LLADDR = 1, 2
# values
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
NUD_PERMANENT = 0x80

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope,
#                                       type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")
MAX_REPLY = 1 << 16  # one recv; a dump of a guest's few links fits many times over


class NetlinkError(OSError):
    """The kernel refused a request (errno from its NLMSG_ERROR)."""


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One rtattr, padded to 4 bytes."""
    raw = _RTATTR.pack(_RTATTR.size + len(value), kind) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A netlink message: header plus body."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def mac_bytes(mac: str) -> bytes:
    """aa:bb:cc:dd:ee:ff -> 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"invalid MAC address {mac!r}")
    return raw


def _family(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def encode_getlinks(seq: int) -> bytes:
    """Dump every link."""
    return message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq,
                   _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0))


def encode_setlink(seq: int, index: int, *, name: str = "", mtu: int = 0,
                   up: bool | None = None) -> bytes:
    """Rename, set the MTU, bring up or down (what is given)."""
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    attrs = b""
    if name:
        attrs += attr(IFLA_IFNAME, name.encode() + b"\0")
    if mtu:
        attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
    return message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq,
                   _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs)


def encode_addaddr(seq: int, index: int, cidr: ipaddress.IPv4Interface | ipaddress.IPv6Interface
                   ) -> bytes:
    """Add an address (IPv6 without duplicate detection: the pod's address is CNI's)."""
    ip = cidr.ip
    flags = IFA_F_NODAD if ip.version == 6 else 0
    body = _IFADDRMSG.pack(_family(ip), cidr.network.prefixlen, flags, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, ip.packed) + attr(IFA_ADDRESS, ip.packed)
    return message(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq,
                   body)


class RouteRequest(NamedTuple):  # not a dataclass: see agent.crun.CrunConfig
    """A route to add; ``destination`` None is the default route."""

    ifindex: int  # not "index": that is tuple's method
    destination: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    version: int = 4


def encode_addroute(seq: int, route: RouteRequest) -> bytes:
    """Add a route in the main table (link scope when it has no gateway)."""
    family = socket.AF_INET if route.version == 4 else socket.AF_INET6
    dst_len = route.destination.prefixlen if route.destination is not None else 0
    scope = RT_SCOPE_UNIVERSE if route.gateway is not None else RT_SCOPE_LINK
    body = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
    if route.destination is not None and dst_len:
        body += attr(RTA_DST, route.destination.network_address.packed)
    if route.gateway is not None:
        body += attr(RTA_GATEWAY, route.gateway.packed)
    if route.source is not None:
        body += attr(RTA_PREFSRC, route.source.packed)
    body += attr(RTA_OIF, struct.pack("=i", route.ifindex))
    return message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq,
                   body)


def encode_addneigh(seq: int, index: int,
                    address: ipaddress.IPv4Address | ipaddress.IPv6Address, mac: str) -> bytes:
    """A permanent ARP/NDP entry."""
    body = _NDMSG.pack(_family(address), index, NUD_PERMANENT, 0, 0)
    body += attr(NDA_DST, address.packed) + attr(NDA_LLADDR, mac_bytes(mac))
    return message(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq,
                   body)


class Reply(NamedTuple):
    """One message of a reply: its type, sequence and body (after the header)."""

    kind: int
    flags: int
    seq: int
    body: bytes


def parse_messages(data: bytes) -> Iterator[Reply]:
    """Split a datagram into messages; ValueError on a truncated or malformed one."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError(f"malformed netlink message at {offset}: length {length}")
        yield Reply(kind, flags, seq, data[offset + _NLMSGHDR.size:offset + length])
        offset += _align(length)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """rtattrs -> {type: value} (the last of a repeated type wins)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            raise ValueError(f"malformed rtattr at {offset}: length {length}")
        found[kind & 0x3FFF] = data[offset + _RTATTR.size:offset + length]
        offset += _align(length)
    return found


class Link(NamedTuple):
    """A guest network interface as RTM_NEWLINK describes it."""

    ifindex: int
    name: str
    mac: str
    flags: int


def parse_link(body: bytes) -> Link:
    """An RTM_NEWLINK body."""
    _fam, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    attrs = parse_attrs(body[_IFINFOMSG.size:])
    name = attrs.get(IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
    mac = ":".join(f"{b:02x}" for b in attrs.get(IFLA_ADDRESS, b""))
    return Link(index, name, mac, flags)


def error_code(body: bytes) -> int:
    """The (positive) errno of an NLMSG_ERROR body; 0 for an ACK."""
    if len(body) < 4:
        raise ValueError("truncated netlink error message")
    code: int = -struct.unpack_from("=i", body)[0]
    return code


class Netlink:
    """A blocking NETLINK_ROUTE socket: one request at a time, ACKed or dumped."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def request(self, data: bytes, what: str) -> None:
        """Send one request and wait for its ACK; NetlinkError names ``what``."""
        self._sock.send(data)
        seq = _NLMSGHDR.unpack_from(data)[3]
        for reply in self._replies(seq):
            if reply.kind == NLMSG_ERROR:
                code = error_code(reply.body)
                if code:
                    raise NetlinkError(code, f"{what}: {os.strerror(code)}")
                return

    def links(self) -> list[Link]:
        """Every link of the guest."""
        seq = self.next_seq()
        self._sock.send(encode_getlinks(seq))
        found = []
        for reply in self._replies(seq):
            if reply.kind == NLMSG_ERROR and error_code(reply.body):
                code = error_code(reply.body)
                raise NetlinkError(code, f"list links: {os.strerror(code)}")
            if reply.kind == RTM_NEWLINK:
                found.append(parse_link(reply.body))
        return found

    def _replies(self, seq: int) -> Iterator[Reply]:
        """Messages answering ``seq`` until its ACK, error or DONE."""
        while True:
            data = self._sock.recv(MAX_REPLY)
            if not data:
                raise NetlinkError(errno.EIO, "netlink socket closed")
            for reply in parse_messages(data):
                if reply.seq != seq:
                    continue
                yield reply
                if reply.kind in (NLMSG_ERROR, NLMSG_DONE):
                    return
                if not reply.flags & NLM_F_MULTI:
                    return


def loopback_up() -> None:
    """Bring ``lo`` up (blocking: call it from a worker thread)."""
    with Netlink() as nl:
        for link in nl.links():
            if link.name == "lo":
                nl.request(encode_setlink(nl.next_seq(), link.ifindex, up=True), "bring lo up")
                return
    raise NetlinkError(errno.ENODEV, "no lo in the guest")
