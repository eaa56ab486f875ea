"""A sandbox wires its pod's netns into the VM (sandbox/network.py) over fakes: every
interface becomes a NIC with its MAC, the guest is told addresses, routes and neighbours,
the wiring is recorded and undone, also when a later step fails."""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
from pathlib import Path

import pytest

from hypervisors.base import NetworkDevice
from network.types import Interface, IpAddress, Neighbour, NetworkDescription, Route
from sandbox.errors import InvalidArgumentError, SandboxError, UnavailableError
from sandbox.sandbox import Sandbox, SandboxState
from sandbox.state import NetworkRecord, SandboxRecord, read_record
from sandbox.types import SandboxSpec
from tests.unit.fakes import FakeNetworkModel, FakeWorld, fake_sandbox
from tests.unit.test_sandbox_lifecycle import assert_nothing_left

NETNS = "/var/run/netns/cni-test"
SPEC = SandboxSpec(hostname="h1", netns_path=NETNS)
GW = ipaddress.ip_address("10.88.0.1")
DESCRIPTION = NetworkDescription(NETNS, (
    Interface("eth0", "02:42:0a:58:00:05", 1450, (IpAddress.parse("10.88.0.5/16"),)),
    Interface("net1", "02:42:0a:59:00:05", 1500, (IpAddress.parse("fd00::5/64"),)),
), routes=(Route("eth0", None, GW),), neighbours=(Neighbour("eth0", GW, "02:42:0a:58:00:01"),))


def closed(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return False
    except OSError:
        return True


def run(tmp: Path, fail_at: frozenset[str], body: object) -> tuple[Sandbox, FakeWorld]:
    world = FakeWorld()
    world.network = FakeNetworkModel(DESCRIPTION, fail_at)
    sandbox = fake_sandbox(tmp, world)

    async def main() -> None:
        try:
            await body(sandbox, world)  # type: ignore[operator]
        finally:
            await sandbox.stop()

    asyncio.run(main())
    assert_nothing_left(tmp, world, sandbox)
    return sandbox, world


def test_each_interface_becomes_a_nic_and_the_guest_is_told(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        await sandbox.start(SPEC)
        nics = [d for d in world.vm.devices.devices if isinstance(d, NetworkDevice)]
        assert [(n.mac, n.mtu) for n in nics] == [("02:42:0a:58:00:05", 1450),
                                                  ("02:42:0a:59:00:05", 1500)]
        assert world.network is not None
        assert all(closed(fd) for e in world.network.attached for fd in e.queue_fds), \
            "our copies of the queue fds must be closed once the VMM has them"
        calls = [c for c in world.agent.calls if c[0] not in ("guest_details",)]
        assert calls == [
            ("create_sandbox", "h1"),
            ("update_interface", "eth0", "02:42:0a:58:00:05"),
            ("update_interface", "net1", "02:42:0a:59:00:05"),
            ("update_routes", "10.88.0.1"),
            ("add_arp_neighbors", "10.88.0.1"),
        ]
        record = read_record(sandbox.state_path)
        assert record is not None and record.network == [
            NetworkRecord(NETNS, "tcfilter", "eth0", "tap0_kata"),
            NetworkRecord(NETNS, "tcfilter", "net1", "tap1_kata")]
        await sandbox.stop()
        assert world.network.detached == ["tap1_kata", "tap0_kata"]

    run(tmp_path, frozenset(), body)


@pytest.mark.parametrize(("fail_at", "agent_fail", "error", "words", "detached"), [
    ({"scan"}, set(), InvalidArgumentError, "has no interface", []),
    ({"attach:net1"}, set(), UnavailableError, "failed to wire net1", ["tap0_kata"]),
    (set(), {"update_interface"}, SandboxError, "network in the guest",
     ["tap1_kata", "tap0_kata"]),
])
def test_a_failed_wiring_step_undoes_the_rest(
        tmp_path: Path, fail_at: set[str], agent_fail: set[str], error: type[SandboxError],
        words: str, detached: list[str]) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        world.agent_fail_at = frozenset(agent_fail)
        with pytest.raises(error, match=words):
            await sandbox.start(SPEC)
        assert sandbox.state is SandboxState.NEW
        assert world.network is not None and world.network.detached == detached
        assert all(closed(fd) for e in world.network.attached for fd in e.queue_fds)

    run(tmp_path, frozenset(fail_at), body)


def test_no_netns_path_means_no_nic_and_the_host_network_is_refused(tmp_path: Path) -> None:
    async def body(sandbox: Sandbox, world: FakeWorld) -> None:
        with pytest.raises(InvalidArgumentError, match="host's network"):
            await sandbox.start(SandboxSpec(host_network=True))
        assert world.vms == []
        await sandbox.start(SandboxSpec())
        assert not [d for d in world.vm.devices.devices if isinstance(d, NetworkDevice)]
        assert world.network is not None and world.network.attached == []

    run(tmp_path, frozenset(), body)


def test_the_record_round_trips_network_and_host_cgroups() -> None:
    record = SandboxRecord("pod", host_cgroups=["/sys/fs/cgroup/memory/kubepods/pod1/x"],
                           network=[NetworkRecord(NETNS, "macvtap", "eth0", "mvabc123_kata")])
    assert SandboxRecord.from_json(record.to_json()) == record
