"""The host's netlink work on a pod netns, through pyroute2: scan what CNI made, wire an
interface to a tap (tcfilter) or a macvtap, unwire. Every function takes an open
``IPRoute`` and must run inside the pod's netns (`network.netns.run_in_netns`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
from typing import Any

from network import tap
from network.errors import NetworkConfigError, NetworkError
from network.types import Interface, IpAddress, Neighbour, NetworkDescription, Route

#: Ethernet interfaces CNI plugins hand a pod; a guest NIC can take their place.
WIREABLE_KINDS = frozenset({"veth", "macvlan"})
ETH_P_ALL = 0x0003
IFF_UP, IFF_ALLMULTI = 0x1, 0x200
MACVTAP_INDEX_BASE, MACVTAP_INDEX_SPAN = 1 << 20, 1 << 29
INGRESS = 0xFFFF0000  # the ingress qdisc's handle, ffff:
FILTER_PRIO = 49152
RT_TABLE_MAIN, RTPROT_KERNEL, RTN_UNICAST = 254, 2, 1
RT_SCOPE_LINK, RT_SCOPE_HOST = 253, 254
NUD_PERMANENT = 0x80
# errno values netlink answers for "already gone"
_GONE = frozenset({2, 19, 22})  # ENOENT, ENODEV, EINVAL (no ingress qdisc to delete)


def scan(ipr: Any, netns_path: str) -> NetworkDescription:
    """What CNI put in the netns: its interfaces (not lo), addresses, routes of the main
    table that the guest must be told of, and permanent neighbours."""
    links = {int(m["index"]): m for m in ipr.get_links()}
    names = {i: str(m.get_attr("IFLA_IFNAME")) for i, m in links.items()}
    pod = {i: m for i, m in links.items() if names[i] != "lo"}
    if not pod:
        raise NetworkConfigError(
            f"network namespace {netns_path} has no interface but lo: a CNI plugin must "
            "add one (or set internetworking_model = \"none\" for pods without network)")
    addresses: dict[int, list[IpAddress]] = {i: [] for i in pod}
    for a in ipr.get_addr():
        if a["index"] in pod and a["scope"] not in (RT_SCOPE_LINK, RT_SCOPE_HOST):
            ip = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            addresses[a["index"]].append(IpAddress.parse(f"{ip}/{a['prefixlen']}"))
    try:
        interfaces = tuple(_interface(m, names[i], tuple(addresses[i])) for i, m in pod.items())
        routes = tuple(r for r in (_route(m, names) for m in _main_routes(ipr)) if r)
        neighbours = tuple(
            Neighbour(names[n["ifindex"]], ipaddress.ip_address(n.get_attr("NDA_DST")),
                      str(n.get_attr("NDA_LLADDR")))
            for n in ipr.get_neighbours()
            if n["ifindex"] in pod and n["state"] & NUD_PERMANENT and n.get_attr("NDA_LLADDR"))
        return NetworkDescription(netns_path, interfaces, routes, neighbours)
    except ValueError as e:
        raise NetworkConfigError(f"network namespace {netns_path}: {e}") from e


def _interface(msg: Any, name: str, addresses: tuple[IpAddress, ...]) -> Interface:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind not in WIREABLE_KINDS:
        raise NetworkConfigError(
            f"interface {name} is {'a ' + kind if kind else 'a physical or unknown device'}: "
            f"only {' and '.join(sorted(WIREABLE_KINDS))} interfaces can be wired into the VM")
    return Interface(name, str(msg.get_attr("IFLA_ADDRESS")), int(msg.get_attr("IFLA_MTU")),
                     addresses)


def _main_routes(ipr: Any) -> list[Any]:
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=family):
            table = r.get_attr("RTA_TABLE") or r["table"]
            if (table == RT_TABLE_MAIN and r["proto"] != RTPROT_KERNEL
                    and r["type"] == RTN_UNICAST and not r.get_attr("RTA_MULTIPATH")):
                found.append(r)
    return found


def _route(msg: Any, names: dict[int, str]) -> Route | None:
    device = names.get(msg.get_attr("RTA_OIF"))
    if device is None or device == "lo":
        return None
    dst = msg.get_attr("RTA_DST")
    destination = ipaddress.ip_network(f"{dst}/{msg['dst_len']}") if dst else None
    if destination is not None and destination.is_link_local:
        return None  # the guest kernel makes its own fe80::/64
    gateway, source = msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_PREFSRC")
    return Route(device, destination,
                 ipaddress.ip_address(gateway) if gateway else None,
                 ipaddress.ip_address(source) if source else None)


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"no interface {name} in the pod's network namespace")
    return int(found[0])


def _redirect(ipr: Any, src: int, dst: int) -> None:
    """Everything arriving at ``src`` leaves through ``dst`` (ingress + u32 + mirred)."""
    ipr.tc("add", "ingress", src, "ffff:")
    ipr.tc("add-filter", "u32", src, parent=INGRESS, protocol=ETH_P_ALL, prio=FILTER_PRIO,
           target=0x10001, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": dst})


def wire_tcfilter(ipr: Any, iface: Interface, tap_name: str, queues: int) -> tuple[int, ...]:
    """A tap beside ``iface`` and tc redirects both ways; the tap's queue fds."""
    fds = tap.open_tap_queues(tap_name, queues)
    try:
        veth, tap_index = _index(ipr, iface.name), _index(ipr, tap_name)
        ipr.link("set", index=tap_index, mtu=iface.mtu, state="up")
        _redirect(ipr, veth, tap_index)
        _redirect(ipr, tap_index, veth)
    except BaseException:
        tap.close_all(fds)
        unwire(ipr, iface.name, tap_name)
        raise
    return fds


def wire_macvtap(ipr: Any, iface: Interface, tap_name: str, queues: int) -> tuple[int, ...]:
    """A passthru macvtap on ``iface``: every frame the interface receives goes to the
    guest (whose NIC has the interface's MAC), none to the netns's own stack, which would
    otherwise answer ARP for the pod's address too. Its queue fds."""
    lower = _index(ipr, iface.name)
    try:
        index = _add_macvtap(ipr, tap_name, lower)
        # All multicast: the guest's own filters (IPv6 neighbour discovery's solicited-node
        # groups) never reach a macvtap, which would otherwise drop those frames.
        up = IFF_UP | IFF_ALLMULTI
        ipr.link("set", index=index, mtu=iface.mtu, flags=up, change=up)
        return tap.open_macvtap_queues(index, tap_name, queues)
    except BaseException:
        unwire(ipr, iface.name, tap_name)
        raise


def _add_macvtap(ipr: Any, name: str, lower: int) -> int:
    """Add the macvtap with an ifindex no other macvtap's char device uses: the kernel
    names it /dev/tap<ifindex>, and ifindexes repeat across netns (every pod's would be
    /dev/tap3), so the default index could hand us another pod's device."""
    from pyroute2.netlink.exceptions import NetlinkError

    for _ in range(8):
        index = MACVTAP_INDEX_BASE + secrets.randbelow(MACVTAP_INDEX_SPAN)
        if os.path.exists(f"/dev/tap{index}"):
            continue
        try:
            ipr.link("add", ifname=name, kind="macvtap", link=lower, macvtap_mode="passthru",
                     index=index)
        except NetlinkError as e:
            if e.code in (errno.EBUSY, errno.EEXIST) and not ipr.link_lookup(ifname=name):
                continue
            raise
        return index
    raise NetworkError(f"found no free interface index for {name}")


def unwire(ipr: Any, iface_name: str, tap_name: str) -> None:
    """Remove our tap or macvtap and the ingress qdisc (with its filter) from ``iface_name``;
    what is already gone is skipped."""
    from pyroute2.netlink.exceptions import NetlinkError

    for name in (iface_name, tap_name):
        found = ipr.link_lookup(ifname=name)
        if not found:
            continue
        try:
            ipr.tc("del", "ingress", found[0], "ffff:")
        except NetlinkError as e:
            if e.code not in _GONE:
                raise NetworkError(f"failed to remove the ingress qdisc of {name}: {e}") from e
    found = ipr.link_lookup(ifname=tap_name)
    if found:
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code not in _GONE:
                raise NetworkError(f"failed to remove {tap_name}: {e}") from e

