"""The guest's rtnetlink codec (agent/netlink.py): messages as the kernel expects them,
replies parsed or refused (ValueError), never misread."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import netlink as nl


def header(raw: bytes) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("=IHHII", raw)


def test_setlink_renames_sets_mtu_and_brings_up() -> None:
    raw = nl.encode_setlink(7, 3, name="eth1", mtu=1450, up=True)
    length, kind, flags, seq, _ = header(raw)
    assert (length, kind, seq) == (len(raw), nl.RTM_NEWLINK, 7)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    family, _type, index, ifflags, change = struct.unpack_from("=BxHiII", raw, 16)
    assert (family, index, ifflags, change) == (socket.AF_UNSPEC, 3, nl.IFF_UP, nl.IFF_UP)
    attrs = nl.parse_attrs(raw[32:])
    assert attrs[nl.IFLA_IFNAME] == b"eth1\0"
    assert struct.unpack("=I", attrs[nl.IFLA_MTU]) == (1450,)


def test_setlink_down_changes_only_the_up_flag() -> None:
    raw = nl.encode_setlink(1, 2, up=False)
    assert struct.unpack_from("=BxHiII", raw, 16)[3:] == (0, nl.IFF_UP)
    assert nl.parse_attrs(raw[32:]) == {}


@pytest.mark.parametrize(("cidr", "family", "flags"), [
    ("10.88.0.5/16", socket.AF_INET, 0),
    ("fd00::5/64", socket.AF_INET6, nl.IFA_F_NODAD),
])
def test_addaddr(cidr: str, family: int, flags: int) -> None:
    iface = ipaddress.ip_interface(cidr)
    raw = nl.encode_addaddr(2, 4, iface)
    assert header(raw)[1] == nl.RTM_NEWADDR
    fam, prefix, got_flags, _scope, index = struct.unpack_from("=BBBBI", raw, 16)
    assert (fam, prefix, got_flags, index) == (family, iface.network.prefixlen, flags, 4)
    attrs = nl.parse_attrs(raw[24:])
    assert attrs[nl.IFA_LOCAL] == attrs[nl.IFA_ADDRESS] == iface.ip.packed


def test_a_default_route_via_a_gateway() -> None:
    route = nl.RouteRequest(2, None, ipaddress.ip_address("10.88.0.1"))
    raw = nl.encode_addroute(3, route)
    family, dst_len, _src, _tos, table, proto, scope, rtype, _f = struct.unpack_from(
        "=BBBBBBBBI", raw, 16)
    assert (family, dst_len, table, proto, scope, rtype) == (
        socket.AF_INET, 0, nl.RT_TABLE_MAIN, nl.RTPROT_BOOT, nl.RT_SCOPE_UNIVERSE, nl.RTN_UNICAST)
    attrs = nl.parse_attrs(raw[28:])
    assert nl.RTA_DST not in attrs
    assert attrs[nl.RTA_GATEWAY] == bytes([10, 88, 0, 1])
    assert struct.unpack("=i", attrs[nl.RTA_OIF]) == (2,)


def test_a_link_route_has_link_scope_and_a_destination() -> None:
    route = nl.RouteRequest(5, ipaddress.ip_network("fd00:1::/64"), version=6,
                            source=ipaddress.ip_address("fd00:1::5"))
    raw = nl.encode_addroute(4, route)
    fields = struct.unpack_from("=BBBBBBBBI", raw, 16)
    assert (fields[0], fields[1], fields[6]) == (socket.AF_INET6, 64, nl.RT_SCOPE_LINK)
    attrs = nl.parse_attrs(raw[28:])
    assert attrs[nl.RTA_DST] == ipaddress.ip_address("fd00:1::").packed
    assert attrs[nl.RTA_PREFSRC] == ipaddress.ip_address("fd00:1::5").packed


def test_a_permanent_neighbour() -> None:
    raw = nl.encode_addneigh(9, 2, ipaddress.ip_address("10.0.0.1"), "02:42:0a:00:00:01")
    family, index, state, _flags, _type = struct.unpack_from("=BxxxiHBB", raw, 16)
    assert (family, index, state) == (socket.AF_INET, 2, nl.NUD_PERMANENT)
    attrs = nl.parse_attrs(raw[28:])
    assert attrs[nl.NDA_LLADDR] == bytes.fromhex("02420a000001")


def link_message(seq: int, index: int, name: str, mac: bytes, multi: bool = True) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, nl.IFF_UP, 0)
    body += nl.attr(nl.IFLA_IFNAME, name.encode() + b"\0") + nl.attr(nl.IFLA_ADDRESS, mac)
    return nl.message(nl.RTM_NEWLINK, nl.NLM_F_MULTI if multi else 0, seq, body)


def test_a_link_dump_reply_is_parsed() -> None:
    data = (link_message(1, 1, "lo", bytes(6))
            + link_message(1, 2, "eth0", bytes.fromhex("020000000002"))
            + nl.message(nl.NLMSG_DONE, nl.NLM_F_MULTI, 1, b"\0\0\0\0"))
    replies = list(nl.parse_messages(data))
    assert [r.kind for r in replies] == [nl.RTM_NEWLINK, nl.RTM_NEWLINK, nl.NLMSG_DONE]
    links = [nl.parse_link(r.body) for r in replies[:2]]
    assert links[1] == nl.Link(2, "eth0", "02:00:00:00:00:02", nl.IFF_UP)


def test_an_error_reply_carries_the_errno() -> None:
    body = struct.pack("=i", -17) + bytes(16)
    reply = next(nl.parse_messages(nl.message(nl.NLMSG_ERROR, 0, 3, body)))
    assert nl.error_code(reply.body) == 17
    assert nl.error_code(struct.pack("=i", 0)) == 0
    with pytest.raises(ValueError, match="truncated"):
        nl.error_code(b"\0")


@pytest.mark.parametrize("data", [
    struct.pack("=IHHII", 8, 16, 0, 1, 0),      # length shorter than a header
    struct.pack("=IHHII", 100, 16, 0, 1, 0),    # longer than the datagram
])
def test_a_malformed_message_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        list(nl.parse_messages(data))


def test_a_malformed_attribute_is_refused() -> None:
    with pytest.raises(ValueError, match="malformed rtattr"):
        nl.parse_attrs(struct.pack("=HH", 2, 1))
    with pytest.raises(ValueError, match="malformed rtattr"):
        nl.parse_attrs(struct.pack("=HH", 40, 1) + b"abcd")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_parse_or_raise_value_error(data: bytes) -> None:
    try:
        for reply in nl.parse_messages(data):
            nl.parse_attrs(reply.body)
    except ValueError:
        pass


def test_mac_bytes_refuses_a_short_address() -> None:
    with pytest.raises(ValueError, match="MAC"):
        nl.mac_bytes("02:00:00")
