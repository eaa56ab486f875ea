"""The pod network description validates itself: nothing malformed reaches netlink or the
agent."""

from __future__ import annotations

import ipaddress

import pytest

from network.types import (
    Endpoint,
    Interface,
    IpAddress,
    Neighbour,
    NetworkDescription,
    Route,
)

ETH0 = Interface("eth0", "02:42:0a:58:00:05", 1450, (IpAddress.parse("10.88.0.5/16"),
                                                      IpAddress.parse("fd00::5/64")))


def test_a_typical_cni_netns() -> None:
    description = NetworkDescription(
        "/var/run/netns/cni-1", (ETH0,),
        routes=(Route("eth0", None, ipaddress.ip_address("10.88.0.1")),
                Route("eth0", ipaddress.ip_network("fd00::/64"))),
        neighbours=(Neighbour("eth0", ipaddress.ip_address("10.88.0.1"), "02:42:0a:58:00:01"),),
    )
    assert description.interfaces[0].addresses[1].cidr.version == 6


@pytest.mark.parametrize(("make", "words"), [
    (lambda: Interface("", "02:00:00:00:00:01", 1500), "interface name"),
    (lambda: Interface("a" * 16, "02:00:00:00:00:01", 1500), "interface name"),
    (lambda: Interface("eth/0", "02:00:00:00:00:01", 1500), "interface name"),
    (lambda: Interface("eth0", "02:00:00:00:00", 1500), "MAC"),
    (lambda: Interface("eth0", "02:00:00:00:00:0G", 1500), "MAC"),
    (lambda: Interface("eth0", "01:00:5e:00:00:01", 1500), "multicast"),
    (lambda: Interface("eth0", "02:00:00:00:00:01", 67), "MTU"),
    (lambda: Interface("eth0", "02:00:00:00:00:01", 65536), "MTU"),
    (lambda: IpAddress.parse("10.0.0.300/8"), "does not appear"),
    (lambda: Route("eth0", ipaddress.ip_network("10.0.0.0/8"),
                   ipaddress.ip_address("fd00::1")), "mixes IPv4 and IPv6"),
    (lambda: NetworkDescription("/n", (ETH0, ETH0)), "duplicate"),
    (lambda: NetworkDescription("/n", (ETH0,), routes=(Route("eth1"),)), "unknown interface"),
    (lambda: Endpoint(ETH0, "bridge", "tap0_kata", (5,), ("tap0_kata",)), "tcfilter or macvtap"),
    (lambda: Endpoint(ETH0, "tcfilter", "tap0_kata", (), ("tap0_kata",)), "queue fds"),
])  # fmt: skip
def test_malformed_values_are_refused(make: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        make()  # type: ignore[operator]
