"""Pod networking through `ctr run --with-ns network:<path>`: the netns's veth wired into
the VM with tcfilter and with macvtap, traffic both ways with the host end, and nothing of
ours left in the netns afterwards (also after the shim is killed with -9).

All traffic stays between the test's own veth pair; every transfer is bounded.
"""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from tests.harness.images import IMAGE_REF
from tests.harness.kata import Kata
from tests.harness.podnet import MODELS, PodNetns, fetched, http_get, http_server, pod_netns
from tests.harness.procs import wait_until
from tests.harness.scenarios import BOOT_TIMEOUT, KATA, explain, remove, wait_task_status

PAYLOAD = os.urandom(256 * 1024)


def use_model(kata: Kata, model: str) -> None:
    kata.write_config({"runtime": {"internetworking_model": model}})


def run_with_netns(kata: Kata, net: PodNetns, cid: str, *cmd: str, detach: bool = False):
    args = ["run", "--runtime", KATA, "--with-ns", f"network:{net.path}"]
    args += ["-d"] if detach else ["--rm"]
    return kata.cd.ctr(*args, IMAGE_REF, cid, *cmd, timeout=BOOT_TIMEOUT)


@pytest.mark.parametrize("model", MODELS)
def test_a_container_in_a_pod_netns_talks_to_the_host_both_ways(kata: Kata, model: str) -> None:
    use_model(kata, model)
    with pod_netns() as net, http_server(net.host_ip, PAYLOAD) as port:
        mac = net.pod_mac()
        script = (f"ip -o addr show eth0; ip -o link show eth0; ip route; "
                  f"ping -c 2 -W 5 {net.host_ip} >/dev/null && echo PING-OK; "
                  f"ping -c 1 -W 5 127.0.0.1 >/dev/null && echo LO-OK; "
                  f"{http_get(net.host_ip, port)} | tail -c {len(PAYLOAD)} | md5sum")
        res = run_with_netns(kata, net, "net1", "sh", "-c", script)
        assert res.returncode == 0, explain(res)
        out = res.stdout
        assert f"inet {net.pod_ip}/24" in out and f"inet6 {net.pod_ip6}/64" in out, out
        assert mac in out, f"the guest NIC should carry the veth's MAC {mac}: {out}"
        assert f"default via {net.host_ip} dev eth0" in out, out
        assert "PING-OK" in out and "LO-OK" in out, out
        assert hashlib.md5(PAYLOAD).hexdigest() in out, out
        assert net.leftovers() == [], net.leftovers()
        # A server in the container, a client on the host.
        serve = "mkdir -p /w && echo pong-from-the-vm > /w/i && exec httpd -f -p 8080 -h /w"
        res = run_with_netns(kata, net, "net2", "sh", "-c", serve, detach=True)
        assert res.returncode == 0, explain(res)
        try:
            assert wait_task_status(kata.cd, "net2", ["RUNNING"], timeout=30) == "RUNNING"
            got: list[bytes] = []
            wait_until(lambda: fetched(f"http://{net.pod_ip}:8080/i", got), 60, 0.5)
            assert got and got[0] == b"pong-from-the-vm\n", got
        finally:
            remove(kata.cd, "net2")
        assert net.leftovers() == [], net.leftovers()


def test_two_interfaces_give_two_guest_nics(kata: Kata) -> None:
    with pod_netns(second=True) as net:
        other_host = net.host_ip.rsplit(".", 2)[0] + f".{int(net.host_ip.split('.')[2]) + 1}.1"
        script = (f"ip -o -4 addr; ping -c 1 -W 5 {net.host_ip} >/dev/null && echo ETH0-OK; "
                  f"ping -c 1 -W 5 {other_host} >/dev/null && echo NET1-OK")
        res = run_with_netns(kata, net, "two", "sh", "-c", script)
        assert res.returncode == 0, explain(res)
        assert "eth0" in res.stdout and "net1" in res.stdout, res.stdout
        assert "ETH0-OK" in res.stdout and "NET1-OK" in res.stdout, res.stdout
        assert net.leftovers() == [], net.leftovers()


@pytest.mark.parametrize("model", MODELS)
def test_a_killed_shim_leaves_nothing_in_the_netns(kata: Kata, model: str) -> None:
    use_model(kata, model)
    with pod_netns() as net:
        res = run_with_netns(kata, net, "net3", "sleep", "300", detach=True)
        assert res.returncode == 0, explain(res)
        assert wait_task_status(kata.cd, "net3", ["RUNNING"], timeout=30) == "RUNNING"
        assert net.leftovers(), "the VM's tap should be in the netns while the pod runs"
        mac = net.pod_mac()
        for shim in kata.shim_daemons():
            os.kill(shim.pid, signal.SIGKILL)
        # containerd notices, runs `shim delete` (the crash cleanup) and reports the exit.
        wait_until(lambda: kata.cd.tasks().get("net3") != "RUNNING", 60, 0.2)
        if "net3" in kata.cd.tasks():
            res = kata.cd.ctr("task", "delete", "--force", "net3", timeout=60)
            assert res.returncode == 0 or "not found" in res.stderr, explain(res)
        res = kata.cd.ctr("container", "delete", "net3")
        assert res.returncode == 0, explain(res)
        # containerd runs the crash cleanup in the background of its task service.
        wait_until(lambda: net.leftovers() == [], 30, 0.2)
        assert net.leftovers() == [], net.leftovers()
        assert net.pod_mac() == mac  # the veth is CNI's: kept as it was


@pytest.mark.parametrize(("kind", "expected"), [
    ("empty", "has no interface but lo"),
    ("bridge", "eth0 is a bridge: only macvlan and veth interfaces can be wired"),
])
def test_a_netns_we_cannot_wire_is_refused_clearly(kata: Kata, kind: str, expected: str) -> None:
    with pod_netns(kind) as net:
        res = run_with_netns(kata, net, "bad1", "true")
        assert res.returncode != 0, explain(res)
        assert expected in res.stderr, explain(res)
        assert net.leftovers() == [], net.leftovers()
    assert kata.sandbox_dirs() == []


def test_a_bad_netns_path_and_the_host_network_are_refused(kata: Kata, tmp_path) -> None:
    not_a_netns = tmp_path / "netns"
    not_a_netns.write_text("")
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, "--with-ns",
                      f"network:{not_a_netns}", IMAGE_REF, "bad2", "true", timeout=BOOT_TIMEOUT)
    assert res.returncode != 0 and "is not a network namespace" in res.stderr, explain(res)
    res = kata.cd.ctr("run", "--rm", "--runtime", KATA, "--net-host", IMAGE_REF, "bad3", "true",
                      timeout=BOOT_TIMEOUT)
    assert res.returncode != 0 and "host's network" in res.stderr, explain(res)
    assert kata.sandbox_dirs() == []
