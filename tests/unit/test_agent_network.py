"""The guest's network set-up (agent/network.py): requests validated before any netlink
call, and the netlink calls themselves tried against this host's kernel inside a
throwaway network namespace (a veth pair stands in for the VM's virtio NIC)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from agent import netlink
from agent.errors import InvalidArgument, NotFound
from agent.network import MAX_ITEMS, GuestNetwork, _route
from network.netns import run_in_netns
from protocols import agent_pb2 as pb

MAC = "02:00:00:00:00:05"


def iface(**kw: object) -> pb.UpdateInterfaceRequest:
    fields = {"name": "eth0", "hwAddr": MAC, "mtu": 1500,
              "IPAddresses": [pb.IPAddress(family=pb.v4, address="10.1.0.5", mask="24")]}
    fields.update(kw)
    return pb.UpdateInterfaceRequest(interface=pb.Interface(**fields))  # type: ignore[arg-type]


@pytest.mark.parametrize(("request_", "words"), [
    (iface(name=""), "interface name"),
    (iface(name="x" * 16), "interface name"),
    (iface(name="a/b"), "interface name"),
    (iface(hwAddr="02:00"), "MAC"),
    (iface(mtu=40), "MTU"),
    (iface(mtu=70000), "MTU"),
    (iface(IPAddresses=[pb.IPAddress(family=pb.v4, address="10.1.0.5", mask="33")]), "address"),
    (iface(IPAddresses=[pb.IPAddress(family=pb.v4, address="fd00::1", mask="64")]), "family"),
    (iface(IPAddresses=[pb.IPAddress(family=pb.v4, address="10.0.0.1", mask="8")]
           * (MAX_ITEMS + 1)), "too many"),
])
def test_a_bad_interface_is_refused_before_netlink(request_: pb.UpdateInterfaceRequest,
                                                   words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        asyncio.run(GuestNetwork().update_interface(request_))


@pytest.mark.parametrize(("route", "words"), [
    (pb.Route(dest="10.0.0.0/33", device="eth0"), "destination"),
    (pb.Route(dest="10.0.0.0/8", gateway="nope", device="eth0"), "gateway"),
    (pb.Route(dest="10.0.0.0/8", gateway="fd00::1", device="eth0"), "mixes"),
    (pb.Route(dest="", device=""), "interface name"),
])
def test_a_bad_route_is_refused(route: pb.Route, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        _route(route)


def test_routes_through_a_gateway_come_after_link_routes() -> None:
    seen: list[list[str]] = []
    net = GuestNetwork()
    net._add_routes = lambda routes: seen.append(  # type: ignore[method-assign]
        [str(r.destination or "default") for _, r in routes])
    routes = pb.Routes(Routes=[
        pb.Route(gateway="10.1.0.1", device="eth0"),
        pb.Route(dest="10.1.0.1/32", device="eth0"),
    ])
    asyncio.run(net.update_routes(pb.UpdateRoutesRequest(routes=routes)))
    assert seen == [["10.1.0.1/32", "default"]]


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


@pytest.fixture
def guest_netns() -> Iterator[str]:
    """A netns with a veth end named like a fresh virtio NIC (eth9, down, MAC ``MAC``)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    name = f"kag{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "add", "eth9", "address", MAC, "type", "veth", "peer", "name",
           "peer9")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def test_the_kernel_takes_what_the_agent_sends(guest_netns: str) -> None:
    net = GuestNetwork()
    cidrs = [ipaddress.ip_interface("10.1.0.5/24"), ipaddress.ip_interface("fd00:1::5/64")]

    def configure() -> None:
        netlink.loopback_up()
        assert net._set_up("eth0", MAC, 1400, cidrs) == "eth9"
        routes = [_route(pb.Route(dest="10.9.0.0/16", gateway="10.1.0.1", device="eth0")),
                  _route(pb.Route(gateway="10.1.0.1", device="eth0")),
                  _route(pb.Route(dest="fd00:9::/64", gateway="fd00:1::1", device="eth0",
                                  family=pb.v6))]
        net._add_routes(routes)
        net._add_neighbours([("eth0", ipaddress.ip_address("10.1.0.1"), "02:00:00:00:00:01")])

    run_in_netns(f"/run/netns/{guest_netns}", configure)
    links = ip("-n", guest_netns, "-o", "link")
    assert "eth0" in links and "eth9" not in links and "mtu 1400" in links, links
    assert "UP" in ip("-n", guest_netns, "-o", "link", "show", "lo")
    addrs = ip("-n", guest_netns, "-o", "addr", "show", "eth0")
    assert "inet 10.1.0.5/24" in addrs and "inet6 fd00:1::5/64" in addrs, addrs
    routes = ip("-n", guest_netns, "route") + ip("-n", guest_netns, "-6", "route")
    assert "default via 10.1.0.1 dev eth0" in routes, routes
    assert "10.9.0.0/16 via 10.1.0.1 dev eth0" in routes, routes
    assert "fd00:9::/64 via fd00:1::1 dev eth0" in routes, routes
    neigh = ip("-n", guest_netns, "neigh", "show", "dev", "eth0")
    assert "10.1.0.1 lladdr 02:00:00:00:00:01 PERMANENT" in neigh, neigh


def test_a_nic_that_never_appears_is_not_found(guest_netns: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.network.NIC_WAIT_SECONDS", 0.2)

    def configure() -> None:
        with netlink.Netlink() as nl:
            from agent.network import _wait_for_mac
            _wait_for_mac(nl, "02:99:99:99:99:99", lambda: None)

    with pytest.raises(NotFound, match="02:99:99:99:99:99"):
        run_in_netns(f"/run/netns/{guest_netns}", configure)


def test_a_nic_whose_driver_loads_while_it_is_awaited_is_set_up(guest_netns: str) -> None:
    """A NIC hot-plugged after the boot has no driver yet (virtio_net loads only for a NIC):
    the agent asks for drivers while it waits, and the NIC then appears."""
    late = "02:00:00:00:00:07"
    asked: list[int] = []

    def load_drivers() -> None:  # stands in for virtio_net's probe of the new device
        asked.append(1)
        if len(asked) == 2:
            ip("-n", guest_netns, "link", "add", "eth7", "address", late, "type", "veth",
               "peer", "name", "peer7")

    net = GuestNetwork(load_drivers)
    found: list[str] = []
    run_in_netns(f"/run/netns/{guest_netns}",
                 lambda: found.append(net._set_up("eth1", late, 1500, [])))
    assert found == ["eth7"]
    assert len(asked) >= 2
    assert "eth1" in ip("-n", guest_netns, "-o", "link", "show", "eth1")


def test_the_kernel_refusal_names_what_failed(guest_netns: str) -> None:
    def configure() -> None:
        GuestNetwork()._add_routes([_route(pb.Route(gateway="10.200.0.1", device="eth9"))])

    with pytest.raises(netlink.NetlinkError, match=r"add route default via 10\.200\.0\.1"):
        run_in_netns(f"/run/netns/{guest_netns}", configure)
