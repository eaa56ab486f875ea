"""The host's netlink work (network/): scanning what CNI leaves in a netns and wiring it
for a VM, against this host's kernel in throwaway network namespaces (no VM: the queue
fds are checked and closed). Observed with iproute2."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from network import tap
from network.errors import NetworkConfigError
from network.model import NetlinkModel, detach_recorded
from network.netns import run_in_netns
from network.types import Route
from tests.harness.podnet import PodNetns, pod_netns


@pytest.fixture
def net() -> Iterator[PodNetns]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with pod_netns() as made:
        yield made


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


def test_scan_reads_what_cni_left(net: PodNetns) -> None:
    ip("-n", net.name, "route", "add", "10.77.0.0/16", "via", net.host_ip)
    ip("-n", net.name, "neigh", "add", net.host_ip, "lladdr", "02:00:00:00:00:01", "dev",
       "eth0", "nud", "permanent")
    found = asyncio.run(NetlinkModel("tcfilter").scan(net.path))
    (eth0,) = found.interfaces
    assert (eth0.name, eth0.mac, eth0.mtu) == ("eth0", net.pod_mac(), 1500)
    assert {str(a.cidr) for a in eth0.addresses} == {f"{net.pod_ip}/24", f"{net.pod_ip6}/64"}
    gw = ipaddress.ip_address(net.host_ip)
    assert Route("eth0", None, gw) in found.routes
    assert Route("eth0", ipaddress.ip_network("10.77.0.0/16"), gw) in found.routes
    # The kernel's own routes (the subnets, fe80::/64) are the guest kernel's to make.
    assert all(r.gateway is not None for r in found.routes), found.routes
    assert [(str(n.address), n.mac) for n in found.neighbours] == [
        (net.host_ip, "02:00:00:00:00:01")]


@pytest.mark.parametrize(("kind", "words"), [
    ("empty", "has no interface but lo"),
    ("bridge", "eth0 is a bridge: only macvlan and veth"),
])
def test_scan_refuses_what_it_cannot_wire(kind: str, words: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    with pod_netns(kind) as made, pytest.raises(NetworkConfigError, match=words):
        asyncio.run(NetlinkModel("tcfilter").scan(made.path))


def test_a_path_that_is_not_a_netns_is_refused(tmp_path: object) -> None:
    with pytest.raises(NetworkConfigError, match="cannot open the network namespace"):
        run_in_netns("/nonexistent/netns", lambda: None)
    with pytest.raises(NetworkConfigError, match="is not a network namespace"):
        run_in_netns("/proc/self/ns/mnt", lambda: None)


def test_tcfilter_redirects_both_ways_and_detach_removes_it_all(net: PodNetns) -> None:
    model = NetlinkModel("tcfilter")
    description = asyncio.run(model.scan(net.path))
    endpoint = asyncio.run(model.attach(net.path, description.interfaces[0], 0))
    try:
        assert endpoint.tap_name == "tap0_kata" and len(endpoint.queue_fds) == 1
        links = ip("-n", net.name, "-o", "link")
        assert "tap0_kata" in links
        for dev, target in (("eth0", "tap0_kata"), ("tap0_kata", "eth0")):
            filters = subprocess.run(["tc", "-n", net.name, "filter", "show", "dev", dev,
                                      "ingress"], capture_output=True, text=True,
                                     check=True).stdout
            assert f"Egress Redirect to device {target}" in filters, filters
        asyncio.run(model.detach(net.path, endpoint))
        asyncio.run(model.detach(net.path, endpoint))  # idempotent
    finally:
        tap.close_all(endpoint.queue_fds)
    assert net.leftovers() == []


def test_macvtap_gets_its_own_char_device_in_every_netns(net: PodNetns) -> None:
    model = NetlinkModel("macvtap")
    with pod_netns() as other:
        ends = []
        try:
            for made in (net, other):
                found = asyncio.run(model.scan(made.path))
                ends.append(asyncio.run(model.attach(made.path, found.interfaces[0], 0)))
            names = [e.tap_name for e in ends]
            assert names[0] != names[1], names
            assert "passthru" in ip("-n", net.name, "-d", "link", "show", names[0])
            for e in ends:  # each fd is its own macvtap (open_macvtap_queues checks)
                assert len(e.queue_fds) == 1
        finally:
            for made, e in zip((net, other), ends, strict=False):
                tap.close_all(e.queue_fds)
                detach_recorded(made.path, e.interface.name, e.tap_name)
        assert other.leftovers() == []
    assert net.leftovers() == []


def test_a_macvtap_device_of_another_name_is_refused(net: PodNetns) -> None:
    name = f"mv{secrets.token_hex(3)}_kata"
    ip("-n", net.name, "link", "add", name, "link", "eth0", "type", "macvtap")
    index = int(ip("-n", net.name, "-o", "link", "show", name).split(":")[0])
    try:
        with pytest.raises(OSError, match="not our macvtap"):
            tap.open_macvtap_queues(index, "someone_else", 1)
    finally:
        ip("-n", net.name, "link", "del", name)


def test_the_worker_reports_refusals_and_failures_typed() -> None:
    from network.errors import NetworkError
    from network.model import _worker_reply

    assert _worker_reply(b'{"ok": {"queues": 1}}', b"", 0) == {"queues": 1}
    with pytest.raises(NetworkConfigError, match="no interface"):
        _worker_reply(b'{"error": "netns x has no interface", "config": true}', b"", 0)
    with pytest.raises(NetworkError, match="EBUSY") as raised:
        _worker_reply(b'{"error": "EBUSY", "config": false}', b"", 0)
    assert not isinstance(raised.value, NetworkConfigError)
    with pytest.raises(NetworkError, match=r"exit 1.*Traceback"):
        _worker_reply(b"", b"Traceback: boom", 1)


def test_an_unknown_worker_operation_is_an_error() -> None:
    from network.errors import NetworkError
    from network.model import _run_worker

    with pytest.raises(NetworkError, match="unknown operation"):
        asyncio.run(_run_worker({"op": "format-disk", "netns": "/run/netns/x"}))


def test_the_shim_never_imports_pyroute2() -> None:
    """pyroute2 costs 13 MiB of RSS: only the short-lived worker may import it."""
    code = ("import sys, shim.daemon, sandbox.sandbox, sandbox.cleanup, network.model; "
            "print('pyroute2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "False"
